//! Orders and their status machine. Input is parsed into these types at the
//! edge, so an invalid order cannot exist past the handler.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use service_kit::DeliveryMode;
use utoipa::ToSchema;
use uuid::Uuid;

/// Limits on what an order may contain.
pub const MAX_ITEMS: usize = 100;
/// Largest quantity of one line.
pub const MAX_QUANTITY: i64 = 10_000;
const MAX_ID_LEN: usize = 64;

/// An order id (a UUID).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(transparent)]
pub struct OrderId(pub Uuid);

impl OrderId {
    /// A new, time-ordered id.
    pub fn new() -> Self {
        OrderId(Uuid::now_v7())
    }
}

impl Default for OrderId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for OrderId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl FromStr for OrderId {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Uuid::parse_str(s)
            .map(OrderId)
            .map_err(|_| format!("{s:?} is not a valid order id (expected a UUID)"))
    }
}

/// One line of an order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Item {
    /// Stock-keeping unit (1 to 64 printable characters, trimmed).
    #[schema(min_length = 1, max_length = 64)]
    pub sku: String,
    /// How many; 1 to 10 000.
    #[schema(minimum = 1, maximum = 10_000)]
    pub quantity: i64,
}

/// Where an order is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum OrderStatus {
    /// Committed; shipping has not acknowledged it yet.
    Pending,
    /// Shipping acknowledged it (a shipment exists).
    Accepted,
    /// Shipping reported it shipped.
    Shipped,
}

impl OrderStatus {
    /// Storage and wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            OrderStatus::Pending => "pending",
            OrderStatus::Accepted => "accepted",
            OrderStatus::Shipped => "shipped",
        }
    }

    fn rank(self) -> u8 {
        match self {
            OrderStatus::Pending => 0,
            OrderStatus::Accepted => 1,
            OrderStatus::Shipped => 2,
        }
    }

    /// The status machine: `pending → accepted → shipped`, and `pending →
    /// shipped` (a shipped report proves shipping accepted the order even if
    /// its acknowledgement was lost). Moving to the current status is a no-op;
    /// moving backwards is illegal.
    pub fn transition(self, to: OrderStatus) -> Result<Transition, IllegalTransition> {
        match to.rank().cmp(&self.rank()) {
            std::cmp::Ordering::Greater => Ok(Transition::Changed),
            std::cmp::Ordering::Equal => Ok(Transition::Unchanged),
            std::cmp::Ordering::Less => Err(IllegalTransition { from: self, to }),
        }
    }
}

impl fmt::Display for OrderStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for OrderStatus {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "pending" => Ok(OrderStatus::Pending),
            "accepted" => Ok(OrderStatus::Accepted),
            "shipped" => Ok(OrderStatus::Shipped),
            other => Err(format!(
                "unknown status {other:?} (expected pending, accepted or shipped)"
            )),
        }
    }
}

/// What applying a status did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// The status moved forward.
    Changed,
    /// The order already had that status: nothing changed.
    Unchanged,
}

/// A transition the status machine forbids.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("an order cannot go from {from} to {to}")]
pub struct IllegalTransition {
    /// Current status.
    pub from: OrderStatus,
    /// Requested status.
    pub to: OrderStatus,
}

/// The body of `POST /orders`, as received.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateOrderRequest {
    /// Who ordered (1 to 64 printable characters, trimmed).
    #[schema(min_length = 1, max_length = 64)]
    pub customer_id: String,
    /// What was ordered (1 to 100 lines).
    #[schema(min_items = 1, max_items = 100)]
    #[serde(deserialize_with = "service_kit::objects")]
    pub items: Vec<Item>,
    /// How to deliver it to shipping (default: the service's configured mode).
    #[serde(default)]
    pub delivery_mode: Option<DeliveryMode>,
}

/// A validated new order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewOrder {
    /// Who ordered.
    pub customer_id: String,
    /// At least one item, each with a positive quantity.
    pub items: Vec<Item>,
    /// How it travels to shipping.
    pub mode: DeliveryMode,
}

impl NewOrder {
    /// Validates a request; the error says which field is wrong and why.
    pub fn parse(req: CreateOrderRequest, default_mode: DeliveryMode) -> Result<Self, String> {
        let customer_id = req.customer_id.trim().to_string();
        if customer_id.is_empty() {
            return Err("customer_id must not be empty".into());
        }
        if customer_id.chars().count() > MAX_ID_LEN
            || !service_kit::text::all_printable(&customer_id)
        {
            return Err(format!(
                "customer_id must be at most {MAX_ID_LEN} printable characters"
            ));
        }
        if req.items.is_empty() {
            return Err("items must contain at least one item".into());
        }
        if req.items.len() > MAX_ITEMS {
            return Err(format!("items must contain at most {MAX_ITEMS} items"));
        }
        for (i, item) in req.items.iter().enumerate() {
            let sku = item.sku.trim();
            if sku.is_empty()
                || sku.chars().count() > MAX_ID_LEN
                || !service_kit::text::all_printable(sku)
            {
                return Err(format!(
                    "items[{i}].sku must be 1 to {MAX_ID_LEN} printable characters"
                ));
            }
            if item.quantity < 1 || item.quantity > MAX_QUANTITY {
                return Err(format!(
                    "items[{i}].quantity must be between 1 and {MAX_QUANTITY}, got {}",
                    item.quantity
                ));
            }
        }
        let items = req
            .items
            .into_iter()
            .map(|i| Item {
                sku: i.sku.trim().to_string(),
                quantity: i.quantity,
            })
            .collect();
        Ok(NewOrder {
            customer_id,
            items,
            mode: req.delivery_mode.unwrap_or(default_mode),
        })
    }
}

/// An order as stored and as answered.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
pub struct Order {
    /// The order's id.
    pub id: OrderId,
    /// Who ordered.
    pub customer_id: String,
    /// What was ordered.
    pub items: Vec<Item>,
    /// How it travels to shipping.
    pub delivery_mode: DeliveryMode,
    /// Where it is.
    pub status: OrderStatus,
    /// The shipment shipping created for it, once known.
    pub shipment_id: Option<String>,
    /// The last delivery error, if any.
    pub last_error: Option<String>,
    /// Calls made to shipping for this order: at-most-once, 0 or 1; the
    /// outbox modes, the sends it took until shipping acknowledged (0 while
    /// pending).
    pub send_attempts: i64,
    /// When it was created (RFC 3339).
    pub created_at: String,
    /// When shipping acknowledged it.
    pub accepted_at: Option<String>,
    /// When shipping reported it shipped.
    pub shipped_at: Option<String>,
}

/// A report from shipping-service about an order's shipment.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ShipmentEvent {
    /// The shipment the report is about (a UUID).
    #[schema(format = Uuid)]
    pub shipment_id: String,
    /// `accepted` or `shipped`.
    pub status: OrderStatus,
}

#[cfg(test)]
mod tests {
    use super::*;
    use OrderStatus::*;

    #[test]
    fn status_machine() {
        assert_eq!(Pending.transition(Accepted), Ok(Transition::Changed));
        assert_eq!(Pending.transition(Shipped), Ok(Transition::Changed));
        assert_eq!(Accepted.transition(Shipped), Ok(Transition::Changed));
        for s in [Pending, Accepted, Shipped] {
            assert_eq!(s.transition(s), Ok(Transition::Unchanged));
        }
        assert!(Shipped.transition(Accepted).is_err());
        assert!(Shipped.transition(Pending).is_err());
        assert!(Accepted.transition(Pending).is_err());
    }

    fn req(items: Vec<Item>) -> CreateOrderRequest {
        CreateOrderRequest {
            customer_id: "c1".into(),
            items,
            delivery_mode: None,
        }
    }

    #[test]
    fn validation() {
        let m = DeliveryMode::AtMostOnce;
        assert!(NewOrder::parse(req(vec![]), m).is_err());
        let bad_qty = Item {
            sku: "A".into(),
            quantity: 0,
        };
        assert!(NewOrder::parse(req(vec![bad_qty]), m).is_err());
        let neg = Item {
            sku: "A".into(),
            quantity: -3,
        };
        assert!(NewOrder::parse(req(vec![neg]), m).is_err());
        let blank = Item {
            sku: " ".into(),
            quantity: 1,
        };
        assert!(NewOrder::parse(req(vec![blank]), m).is_err());
        let ok = Item {
            sku: "A".into(),
            quantity: 2,
        };
        assert_eq!(NewOrder::parse(req(vec![ok]), m).unwrap().items.len(), 1);
    }
}
