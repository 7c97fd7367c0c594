//! Star or chain: which workers form a step's chain, in which order, with which shards, and
//! whom a broken link blames. Pure: the engine asks with the live workers and acts on the plan.
//!
//! Gradients are summed in shard order, ((g0 + g1) + g2) + ..., so a chain of workers ordered
//! by their shards computes exactly that sum: each adds its own shards, in order, to the running
//! sum it receives and passes it on; the last sends it to the coordinator. The parameters come
//! down the same chain. Every link carries the model's size once per direction and step,
//! whatever the number of workers, where the star costs the coordinator's link 2·N times that.

use crate::assign::group_sizes;
use crate::ids::{ShardIndex, WorkerId};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

/// How gradients and parameters travel (`--topology`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Topology {
    /// The chain when at least two workers can take part, else the star.
    #[default]
    Auto,
    /// The chain whenever two workers can take part.
    Chain,
    /// Every worker to and from the coordinator.
    Star,
}

impl Topology {
    /// `auto`, `chain` or `star`.
    pub fn parse(s: &str) -> Result<Topology, String> {
        match s {
            "auto" => Ok(Topology::Auto),
            "chain" => Ok(Topology::Chain),
            "star" => Ok(Topology::Star),
            _ => Err(format!("{s:?} is not a topology (auto, chain or star)")),
        }
    }
}

impl fmt::Display for Topology {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Topology::Auto => "auto",
            Topology::Chain => "chain",
            Topology::Star => "star",
        })
    }
}

/// Values per chunk: 512 KiB. Small enough that the chain's fill time (one chunk per hop) is
/// short, large enough that per-message costs vanish (see bench/multihost.py).
pub const CHUNK_VALUES: u32 = 128 * 1024;

/// A live worker as the plan sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    /// The connection.
    pub id: WorkerId,
    /// Where peers reach it (`worker --peer-listen`), if anywhere.
    pub peer: Option<String>,
    /// It is on the coordinator's host and uses shared memory: it stays on the star, where its
    /// tensors do not touch the network.
    pub shared_memory: bool,
}

/// A chain member: its connection, its peer address and its shards (contiguous, in order).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    /// The connection.
    pub id: WorkerId,
    /// Where its predecessor reaches it.
    pub peer: String,
    /// Its shards, in shard order.
    pub shards: Vec<ShardIndex>,
}

/// A step's chain: members in shard order, then the workers on the coordinator's shared
/// memory with the last shards (their results are added to the chain's sum in shard order,
/// without touching the network); together they hold every shard.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChainPlan {
    /// First to last.
    pub members: Vec<Link>,
    /// Workers on shared memory and their shards (after every member's).
    pub local: Vec<(WorkerId, Vec<ShardIndex>)>,
}

impl ChainPlan {
    /// The member that computes shard `k`.
    pub fn owner(&self, k: ShardIndex) -> Option<WorkerId> {
        self.members.iter().find(|m| m.shards.contains(&k)).map(|m| m.id)
    }

    /// Whether `id` is a member.
    pub fn has(&self, id: WorkerId) -> bool {
        self.members.iter().any(|m| m.id == id)
    }

    /// The worker on shared memory that computes shard `k`.
    pub fn local_owner(&self, k: ShardIndex) -> Option<WorkerId> {
        self.local.iter().find(|(_, ks)| ks.contains(&k)).map(|&(w, _)| w)
    }

    /// The member that sends the sum to the coordinator.
    pub fn last(&self) -> WorkerId {
        self.members.last().map_or(WorkerId(0), |m| m.id)
    }

    /// The member a broken link is blamed on, as `reporter` saw it: the peer at `peer`, or
    /// with no address (a bad or missing chunk from upstream) the reporter's predecessor.
    pub fn blame(&self, reporter: WorkerId, peer: &str) -> Option<WorkerId> {
        if !peer.is_empty() {
            return self.members.iter().find(|m| m.peer == peer).map(|m| m.id);
        }
        let at = self.members.iter().position(|m| m.id == reporter)?;
        at.checked_sub(1).map(|p| self.members[p].id)
    }
}

/// The speeds a chain's groups are sized by, relative to the median worker: a worker measured
/// slower than the lower bound is sized as if it had it (so it keeps shards and its speed stays
/// known), one faster than the upper as if it had that.
pub const SPEED_RANGE: (f64, f64) = (0.25, 4.0);

/// Why a step goes over the star.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StarBecause {
    /// `--topology star`.
    Chosen,
    /// Fewer than two workers can take part: how many can.
    TooFew(usize),
}

impl fmt::Display for StarBecause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StarBecause::Chosen => write!(f, "--topology star"),
            StarBecause::TooFew(n) => write!(
                f,
                "{n} worker(s) can take part in a chain (a chain needs two with --peer-listen, off the \
                 coordinator's shared memory)"
            ),
        }
    }
}

/// The step's chain: the workers that can take part (a peer address, no shared memory, not
/// `excluded` after a broken link), in joining order, then the workers on shared memory, each
/// with a contiguous group of the `shards` sized by its measured speed (`speeds`, relative to
/// the median worker; unmeasured: 1), within `SPEED_RANGE` so that a slow worker keeps a share
/// and goes on being measured; or why the step goes over the star. (Other workers stand by:
/// their tensors would cross the coordinator's link.) Groups never change a bit of the sum,
/// which is in shard order whoever computes which shard.
pub fn plan(
    topology: Topology,
    candidates: &[Candidate],
    excluded: &BTreeSet<WorkerId>,
    shards: usize,
    speeds: &BTreeMap<WorkerId, f64>,
) -> Result<ChainPlan, StarBecause> {
    if topology == Topology::Star {
        return Err(StarBecause::Chosen);
    }
    let able: Vec<&Candidate> =
        candidates.iter().filter(|c| c.peer.is_some() && !c.shared_memory && !excluded.contains(&c.id)).collect();
    let local: Vec<WorkerId> = candidates.iter().filter(|c| c.shared_memory).map(|c| c.id).collect();
    let ids: Vec<WorkerId> = able.iter().map(|c| c.id).chain(local.iter().copied()).collect();
    let todo: Vec<ShardIndex> = (0..shards).map(ShardIndex).collect();
    let (low, high) = SPEED_RANGE;
    let speed = |id: &WorkerId| speeds.get(id).copied().filter(|s| s.is_finite()).map_or(1.0, |s| s.clamp(low, high));
    let weights: Vec<f64> = ids.iter().map(speed).collect();
    let mut sizes = group_sizes(todo.len(), &weights);
    // With a shard for everyone, everyone keeps one (the largest group gives it up).
    while todo.len() >= sizes.len() && sizes.contains(&0) {
        let (Some(empty), Some(largest)) =
            (sizes.iter().position(|&n| n == 0), (0..sizes.len()).max_by_key(|&i| (sizes[i], std::cmp::Reverse(i))))
        else {
            break;
        };
        sizes[empty] += 1;
        sizes[largest] -= 1;
    }
    let mut rest = &todo[..];
    let groups: Vec<(WorkerId, Vec<ShardIndex>)> = ids
        .iter()
        .zip(sizes)
        .map(|(&id, n)| {
            let (group, tail) = rest.split_at(n.min(rest.len()));
            rest = tail;
            (id, group.to_vec())
        })
        .filter(|(_, group)| !group.is_empty())
        .collect();
    let (local, groups): (Vec<_>, Vec<_>) = groups.into_iter().partition(|(id, _)| local.contains(id));
    if groups.len() < 2 {
        return Err(StarBecause::TooFew(groups.len().min(able.len())));
    }
    let peer = |id: WorkerId| able.iter().find(|c| c.id == id).and_then(|c| c.peer.clone()).unwrap_or_default();
    let members = groups.into_iter().map(|(id, shards)| Link { id, peer: peer(id), shards }).collect();
    Ok(ChainPlan { members, local })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn remote(id: u32) -> Candidate {
        Candidate { id: WorkerId(id), peer: Some(format!("10.0.0.{id}:7000")), shared_memory: false }
    }

    #[test]
    fn the_chain_takes_the_workers_peers_can_reach_in_order_with_contiguous_shards() {
        let local = Candidate { id: WorkerId(1), peer: Some("127.0.0.1:1".into()), shared_memory: true };
        let hidden = Candidate { id: WorkerId(4), peer: None, shared_memory: false };
        let all = [local, remote(2), remote(3), hidden, remote(5)];
        let none = BTreeSet::new();
        let p = plan(Topology::Auto, &all, &none, 4, &BTreeMap::new()).unwrap();
        let got: Vec<(u32, Vec<usize>)> =
            p.members.iter().map(|m| (m.id.0, m.shards.iter().map(|k| k.0).collect())).collect();
        assert_eq!(got, [(2, vec![0]), (3, vec![1]), (5, vec![2])]);
        // The worker on shared memory takes the last shard; the hidden one stands by.
        assert_eq!(p.local, [(WorkerId(1), vec![ShardIndex(3)])]);
        assert_eq!(p.local_owner(ShardIndex(3)), Some(WorkerId(1)));
        assert_eq!(p.owner(ShardIndex(1)), Some(WorkerId(3)));
        assert_eq!(p.owner(ShardIndex(3)), None);
        assert_eq!(p.last(), WorkerId(5));
        assert!(p.has(WorkerId(3)) && !p.has(WorkerId(1)));
        // Fewer shards than members: only members with shards.
        assert_eq!(plan(Topology::Chain, &all, &none, 2, &BTreeMap::new()).unwrap().members.len(), 2);
        // Excluded after a broken link.
        let excluded = BTreeSet::from([WorkerId(3)]);
        let p = plan(Topology::Auto, &all, &excluded, 4, &BTreeMap::new()).unwrap();
        assert_eq!(p.members.iter().map(|m| m.id.0).collect::<Vec<_>>(), [2, 5]);
    }

    #[test]
    fn a_slower_member_gets_a_smaller_contiguous_group_but_keeps_one() {
        let none = BTreeSet::new();
        let three = [remote(1), remote(2), remote(3)];
        let groups = |speeds: &[(u32, f64)]| -> Vec<usize> {
            let speeds = speeds.iter().map(|&(w, s)| (WorkerId(w), s)).collect();
            let p = plan(Topology::Chain, &three, &none, 12, &speeds).unwrap();
            let flat: Vec<usize> = p.members.iter().flat_map(|m| m.shards.iter().map(|k| k.0)).collect();
            assert_eq!(flat, (0..12).collect::<Vec<_>>(), "contiguous, in member order");
            p.members.iter().map(|m| m.shards.len()).collect()
        };
        assert_eq!(groups(&[]), [4, 4, 4], "unmeasured: even");
        assert_eq!(groups(&[(1, 1.0), (2, 0.5), (3, 1.0)]), [5, 2, 5], "half speed, about half the shards");
        let slowest = groups(&[(1, 1.0), (2, 0.01), (3, 1.0)]);
        assert!((1..=2).contains(&slowest[1]), "sized as a quarter of the median, not a hundredth: {slowest:?}");
        // Few shards: a slow member still gets one while there is one for everyone.
        let speeds = [(WorkerId(1), 4.0), (WorkerId(2), 0.25), (WorkerId(3), 4.0)].into_iter().collect();
        let p = plan(Topology::Chain, &three, &none, 4, &speeds).unwrap();
        assert_eq!(p.members.iter().map(|m| m.shards.len()).collect::<Vec<_>>(), [1, 1, 2]);
        assert_eq!(groups(&[(1, 1.0), (2, f64::NAN), (3, 1.0)]), [4, 4, 4], "not a speed: unmeasured");
    }

    #[test]
    fn the_star_when_chosen_or_with_fewer_than_two_members() {
        let none = BTreeSet::new();
        let two = [remote(1), remote(2)];
        assert_eq!(plan(Topology::Star, &two, &none, 4, &BTreeMap::new()), Err(StarBecause::Chosen));
        assert_eq!(plan(Topology::Auto, &two[..1], &none, 4, &BTreeMap::new()), Err(StarBecause::TooFew(1)));
        assert_eq!(plan(Topology::Auto, &two, &none, 1, &BTreeMap::new()), Err(StarBecause::TooFew(1)));
        let hidden = [remote(1), Candidate { id: WorkerId(2), peer: None, shared_memory: false }];
        assert_eq!(plan(Topology::Chain, &hidden, &none, 4, &BTreeMap::new()), Err(StarBecause::TooFew(1)));
        assert_eq!(Topology::parse("chain"), Ok(Topology::Chain));
        assert!(Topology::parse("ring").is_err());
    }

    #[test]
    fn a_broken_link_blames_the_peer_named_or_the_reporters_predecessor() {
        let p =
            plan(Topology::Auto, &[remote(1), remote(2), remote(3)], &BTreeSet::new(), 3, &BTreeMap::new()).unwrap();
        assert_eq!(p.blame(WorkerId(1), "10.0.0.2:7000"), Some(WorkerId(2)));
        assert_eq!(p.blame(WorkerId(3), ""), Some(WorkerId(2)));
        assert_eq!(p.blame(WorkerId(1), ""), None, "the first member's upstream is the coordinator");
        assert_eq!(p.blame(WorkerId(1), "10.9.9.9:1"), None);
    }
}
