//! Pull delivery: an event feed the producer keeps, and a consumer that reads
//! it from an offset it persists itself.
//!
//! Push (the [`crate::outbox`]) has the sender hold the list of pending
//! messages and retry them. Pull turns it around: the producer appends every
//! event to a log in the same transaction as the state change it records
//! ([`FeedLog::append`]), serves it as pages ([`FeedLog::read`],
//! [`FeedLog::read_wait`], wire format in [`wire`]), and the consumer
//! ([`FeedConsumer`]) reads from its own offset. Where the consumer commits
//! that offset decides the guarantee ([`Commit`]):
//!
//! - [`Commit::SameTransaction`]: offset and state change in one transaction,
//!   effectively-once: a crash leaves both or neither;
//! - [`Commit::Periodic`]: state per page, offset on its own every interval,
//!   at-least-once: a crash in between re-applies what was processed.
//!
//! # Never skipping an event: positions are assigned after commit
//!
//! The classic flaw of `WHERE position > $offset` feeds: on Postgres a
//! sequence value is taken when the row is inserted, but transactions commit
//! in any order. A reader that saw 7 while 6 was still uncommitted moves its
//! offset to 7 and never reads 6.
//!
//! This module does not number events at insert. [`FeedLog::append`] inserts
//! the event with a NULL position (and an insertion `seq` used only to order
//! the unnumbered rows). Positions are handed out later by a **sequencer**
//! ([`FeedLog::sequence`], run by every read), in a short transaction that
//!
//! 1. locks the feed's row in `feed_heads` (`UPDATE … RETURNING head`), so
//!    sequencers of one feed run one after the other;
//! 2. numbers every *committed* unnumbered event `head + 1 ..= head + n`
//!    (a fresh statement snapshot, taken after the lock was granted: it sees
//!    the previous sequencer's numbering and every event committed so far);
//! 3. raises `head` by `n` and commits.
//!
//! The invariant: *the numbered events of a feed are exactly the positions
//! `1..=head` (minus a trimmed prefix), and every snapshot sees a prefix of
//! them.* Positions are only written by sequencers; a sequencer writes only
//! rows already committed (an uncommitted row is invisible to it); sequencers
//! are serialised by the head row lock and each commits one contiguous range
//! above all earlier ranges. So range *k+1* commits after range *k*, and any
//! snapshot that sees a position sees all lower ones. A reader that returns
//! positions up to *p* can therefore never meet a position below *p* later:
//! `position > $after` is safe because the numbering follows commit order.
//! A late committer is simply numbered later, above everything already read.
//!
//! Why this rather than the alternatives:
//!
//! - *Serialised append* (a counter row updated by the appending
//!   transaction) is provable too, but every producer transaction holds the
//!   feed's lock from its append to its commit: appends stop scaling, and a
//!   producer frozen mid-transaction (SIGSTOP) blocks every other producer.
//! - *Transaction-id snapshots* (`pg_current_xact_id()` per row, serve what
//!   is below `pg_snapshot_xmin`) are Postgres only, and any long transaction
//!   anywhere in the database holds the whole feed back. Made exact it also
//!   needs the cursor to be a snapshot rather than a position (PgQ).
//!
//! Here producers never wait for each other (one plain `INSERT`, no lock, no
//! `NOTIFY` in their transaction), a frozen producer delays only its own
//! event, and the only lock is the sequencer's, held for a few statements
//! (on Postgres an `idle_in_transaction_session_timeout` ends a sequencing
//! session frozen mid-transaction). SQLite has one writer, so the same code
//! is trivially serial there. The cost: an event becomes readable when a
//! reader sequences it, which every read does first (one extra indexed probe
//! when nothing is pending).
//!
//! # Retention
//!
//! [`FeedLog::trim`] deletes a prefix of positions and raises the feed's
//! `trimmed_upto` mark in the same transaction. A read whose `after` is below
//! the mark fails with [`FeedError::Gone`] (HTTP 410): a consumer that fell
//! behind the retained log is told so instead of silently missing events.
//!
//! # Wake-ups
//!
//! [`FeedLog::notify`] after the producer's commit wakes long-pollers of the
//! process at once; on Postgres the tasks of [`FeedLog::spawn_wakeups`] send
//! one coalesced `pg_notify` outside the producer's transaction and `LISTEN`
//! for other replicas' appends. Long-polls re-read twice a second anyway.
//!
//! # Tables
//!
//! Migration `10004_feed.sql`: `feed_events` and `feed_heads` (producer),
//! `feed_offsets` and `feed_dead` (consumer).

mod consumer;
mod log;
pub mod wire;

pub use consumer::{
    after_commit, after_commit_of, ApplyError, Commit, ConsumerConfig, ConsumerHandle,
    ConsumerStatus, DeadEvent, FeedConsumer, FeedHandler, OffsetRow,
};
pub use log::FeedLog;
pub use wire::{FeedEvent, FeedQuery, Page};

/// Errors of the feed machinery.
#[derive(Debug, thiserror::Error)]
pub enum FeedError {
    /// The events after `after` were trimmed away (HTTP 410).
    #[error("position {after} fell behind the retained log (trimmed up to {trimmed_upto})")]
    Gone {
        /// The position the reader asked to read after.
        after: i64,
        /// Every position up to this one was deleted.
        trimmed_upto: i64,
    },
    /// `after` is beyond the feed's head: the reader follows another log
    /// (HTTP 409).
    #[error("position {after} is beyond the feed's head {head}")]
    Ahead {
        /// The position the reader asked to read after.
        after: i64,
        /// The feed's highest position.
        head: i64,
    },
    /// A stored or received value does not parse.
    #[error("invalid feed data: {0}")]
    Invalid(String),
    /// The database failed.
    #[error(transparent)]
    Db(#[from] sqlx::Error),
}

impl FeedError {
    /// The HTTP status a feed endpoint answers this error with.
    pub fn status(&self) -> http::StatusCode {
        match self {
            Self::Gone { .. } => http::StatusCode::GONE,
            Self::Ahead { .. } => http::StatusCode::CONFLICT,
            Self::Invalid(_) | Self::Db(_) => http::StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}
