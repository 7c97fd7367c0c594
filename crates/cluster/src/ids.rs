//! Typed ids, so a worker id is never taken for a shard index or a step number.

use std::fmt;

/// A worker's id for the life of its connection, given by the coordinator when it joins.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WorkerId(pub u32);

impl fmt::Display for WorkerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "worker {}", self.0)
    }
}

/// A shard's place in the step's fixed split of the global batch (`fit.shards` of them);
/// gradients are summed in this order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ShardIndex(pub usize);

impl fmt::Display for ShardIndex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Who stands behind a worker across reconnects: its client certificate with mutual TLS, else
/// its name and address (see `hub::Hub::party`). Faults, evictions and verification are
/// accounted to it, and a second opinion always comes from another party.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PartyId(pub u32);

/// A live worker and the party behind it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Member {
    /// The connection.
    pub id: WorkerId,
    /// Who is behind it.
    pub party: PartyId,
    /// The address it connected from, if known: a check goes to another host when there is one.
    pub host: Option<std::net::IpAddr>,
}
