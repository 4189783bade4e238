//! Shipments. Input is parsed at the edge into these types.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use service_kit::trace::TraceContext;
use service_kit::DeliveryMode;
use utoipa::ToSchema;
use uuid::Uuid;

const MAX_ITEMS: usize = 100;
const MAX_QUANTITY: i64 = 10_000;
const MAX_SKU_LEN: usize = 64;

/// A UUID-shaped id, parsed from a path or a body.
pub fn parse_uuid(raw: &str, what: &str) -> Result<Uuid, String> {
    Uuid::parse_str(raw).map_err(|_| format!("{raw:?} is not a valid {what} (expected a UUID)"))
}

/// One line of a shipment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Item {
    /// Stock-keeping unit (1 to 64 printable characters).
    #[schema(min_length = 1, max_length = 64)]
    pub sku: String,
    /// How many; 1 to 10 000.
    #[schema(minimum = 1, maximum = 10_000)]
    pub quantity: i64,
}

/// Where a shipment is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ShipmentStatus {
    /// In the warehouse.
    Packing,
    /// Left the warehouse.
    Shipped,
}

impl ShipmentStatus {
    /// Storage and wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            ShipmentStatus::Packing => "packing",
            ShipmentStatus::Shipped => "shipped",
        }
    }
}

impl fmt::Display for ShipmentStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ShipmentStatus {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "packing" => Ok(ShipmentStatus::Packing),
            "shipped" => Ok(ShipmentStatus::Shipped),
            other => Err(format!("unknown shipment status {other:?}")),
        }
    }
}

/// The body of `POST /shipments`, as received.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateShipmentRequest {
    /// The order being shipped (a UUID).
    #[schema(format = Uuid)]
    pub order_id: String,
    /// What to ship (1 to 100 lines).
    #[schema(min_items = 1, max_items = 100)]
    #[serde(deserialize_with = "service_kit::objects")]
    pub items: Vec<Item>,
    /// How to report back to order-service (default at-most-once).
    #[serde(default)]
    pub delivery_mode: Option<DeliveryMode>,
}

/// A validated new shipment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewShipment {
    /// The order being shipped.
    pub order_id: Uuid,
    /// At least one item, each with a positive quantity.
    pub items: Vec<Item>,
    /// How the shipped report travels back.
    pub mode: DeliveryMode,
    /// The trace context the shipment is created in (set by the caller of
    /// [`NewShipment::parse`]).
    pub trace: Option<TraceContext>,
}

impl NewShipment {
    /// Validates a request; the error names the field.
    pub fn parse(req: CreateShipmentRequest) -> Result<Self, String> {
        let order_id = parse_uuid(&req.order_id, "order_id")?;
        if req.items.is_empty() || req.items.len() > MAX_ITEMS {
            return Err(format!("items must hold 1 to {MAX_ITEMS} items"));
        }
        for (i, item) in req.items.iter().enumerate() {
            let sku = item.sku.trim();
            if sku.is_empty()
                || sku.chars().count() > MAX_SKU_LEN
                || !service_kit::text::all_printable(sku)
            {
                return Err(format!(
                    "items[{i}].sku must be 1 to {MAX_SKU_LEN} printable characters"
                ));
            }
            if !(1..=MAX_QUANTITY).contains(&item.quantity) {
                return Err(format!(
                    "items[{i}].quantity must be between 1 and {MAX_QUANTITY}, got {}",
                    item.quantity
                ));
            }
        }
        Ok(NewShipment {
            order_id,
            items: req.items,
            mode: req.delivery_mode.unwrap_or(DeliveryMode::AtMostOnce),
            trace: None,
        })
    }
}

/// A shipment as stored and as answered.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
pub struct Shipment {
    /// The shipment's id (a UUID).
    pub id: Uuid,
    /// The order it ships.
    pub order_id: Uuid,
    /// What it ships.
    pub items: Vec<Item>,
    /// How its shipped report travels back.
    pub delivery_mode: DeliveryMode,
    /// Where it is.
    pub status: ShipmentStatus,
    /// When it was created (RFC 3339).
    pub created_at: String,
    /// When it leaves (or left) the warehouse.
    pub ship_at: String,
    /// When it shipped.
    pub shipped_at: Option<String>,
    /// Calls made to report it shipped (at-most-once: 0 or 1).
    pub report_attempts: i64,
    /// The last report error, if any.
    pub report_error: Option<String>,
    /// When order-service acknowledged the shipped report.
    pub reported_at: Option<String>,
    /// The trace context it was created in (stored, not part of the API).
    #[serde(skip)]
    pub trace: Option<TraceContext>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation() {
        let ok = |items: Vec<Item>| {
            NewShipment::parse(CreateShipmentRequest {
                order_id: Uuid::nil().to_string(),
                items,
                delivery_mode: None,
            })
        };
        assert!(ok(vec![]).is_err());
        assert!(ok(vec![Item {
            sku: "A".into(),
            quantity: 0
        }])
        .is_err());
        assert!(ok(vec![Item {
            sku: "A".into(),
            quantity: 1
        }])
        .is_ok());
        let bad_id = NewShipment::parse(CreateShipmentRequest {
            order_id: "nope".into(),
            items: vec![Item {
                sku: "A".into(),
                quantity: 1,
            }],
            delivery_mode: None,
        });
        assert!(bad_id.is_err());
    }
}
