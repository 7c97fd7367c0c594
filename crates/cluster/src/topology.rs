//! Star or chain: which workers form a step's chain, in which order, with which shards, and
//! whom a broken link blames. Pure: the engine asks with the live workers and acts on the plan.
//!
//! Gradients are summed in shard order, ((g0 + g1) + g2) + ..., so a chain of workers ordered
//! by their shards computes exactly that sum: each adds its own shards, in order, to the running
//! sum it receives and passes it on; the last sends it to the coordinator. The parameters come
//! down the same chain. Every link carries the model's size once per direction and step,
//! whatever the number of workers, where the star costs the coordinator's link 2·N times that.
//! A chain of one member is worth having too: it sends its shards' sum, one gradient, where on
//! the star each shard's gradient crosses the link (and the workers on the coordinator's
//! shared memory, its tail, then add theirs without any crossing it).

use crate::assign::group_sizes;
use crate::ids::{ShardIndex, WorkerId};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::{Duration, Instant};

/// How gradients and parameters travel (`--topology`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Topology {
    /// The chain when a worker can take part, else the star.
    #[default]
    Auto,
    /// The chain whenever a worker can take part.
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

/// A step's chain: members in shard order, then its tail: the workers on the coordinator's
/// shared memory with the last shards, computed as on the star (their tensors do not touch the
/// network) and added to the chain's sum in shard order. Together they hold every shard.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChainPlan {
    /// First to last.
    pub members: Vec<Link>,
    /// Workers on shared memory and their shards (after every member's).
    pub tail: Vec<(WorkerId, Vec<ShardIndex>)>,
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

    /// The worker of the tail that computes shard `k`.
    pub fn tail_owner(&self, k: ShardIndex) -> Option<WorkerId> {
        self.tail.iter().find(|(_, ks)| ks.contains(&k)).map(|&(w, _)| w)
    }

    /// The shards `id` computes, on the chain or in its tail.
    pub fn shards_of(&self, id: WorkerId) -> &[ShardIndex] {
        let member = self.members.iter().find(|m| m.id == id).map(|m| &m.shards[..]);
        member.or_else(|| self.tail.iter().find(|(w, _)| *w == id).map(|(_, ks)| &ks[..])).unwrap_or_default()
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
    /// No worker can take part.
    NoMember,
}

impl fmt::Display for StarBecause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StarBecause::Chosen => write!(f, "--topology star"),
            StarBecause::NoMember => write!(
                f,
                "no worker can take part in a chain (a member needs --peer-listen, to be off the \
                 coordinator's shared memory, and to keep pace)"
            ),
        }
    }
}

/// A worker measured slower than this, relative to the median worker, is benched: it stands
/// by. In a chain every step waits for each member twice (for its shards, then for its hop of
/// the running sum), so a worker this slow costs more than its shards are worth; one that stops
/// in bursts (a busy or failing host) costs a whole burst.
pub const LEAVES_BELOW: f64 = 0.6;

/// Steps a worker stands by the first time; twice as many each time after, up to 64 times as
/// many (a circuit breaker: each return costs the steps it takes to be measured slow again).
pub const BENCHED_STEPS: u64 = 16;

/// The workers benched for being too slow, each until a step, and how often each was. Pure:
/// the engine feeds each step's speeds. A worker back from the bench is measured anew (the
/// engine forgets its pace).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Bench {
    until: BTreeMap<WorkerId, u64>,
    times: BTreeMap<WorkerId, u32>,
}

impl Bench {
    /// At `step`, with the `speeds` relative to the median worker: a worker slower than
    /// `LEAVES_BELOW` is benched, one whose time is served comes back, and workers not `live`
    /// are forgotten. Returns who was benched and who came back, for the log. Unmeasured
    /// workers keep pace.
    pub fn update(
        &mut self,
        step: u64,
        speeds: &BTreeMap<WorkerId, f64>,
        live: &BTreeSet<WorkerId>,
    ) -> (Vec<WorkerId>, Vec<WorkerId>) {
        self.until.retain(|w, _| live.contains(w));
        self.times.retain(|w, _| live.contains(w));
        let mut benched = vec![];
        let served: Vec<WorkerId> = self.until.iter().filter(|&(_, &until)| step >= until).map(|(&w, _)| w).collect();
        for w in &served {
            self.until.remove(w);
        }
        for (&w, &speed) in speeds.iter().filter(|(w, _)| live.contains(w) && !served.contains(w)) {
            if speed < LEAVES_BELOW && !self.until.contains_key(&w) {
                let times = self.times.entry(w).or_default();
                *times += 1;
                self.until.insert(w, step + (BENCHED_STEPS << (*times - 1).min(6)));
                benched.push(w);
            }
        }
        (benched, served)
    }

    /// The workers on the bench.
    pub fn benched(&self) -> BTreeSet<WorkerId> {
        self.until.keys().copied().collect()
    }
}

/// The step's chain: the workers that can take part (a peer address, no shared memory, not
/// `excluded`: blamed for a broken link, or benched), in joining order, then the tail, the
/// workers on shared memory (not benched); each with a contiguous group of the `shards` sized
/// by its measured speed (`speeds`, relative to the median worker; unmeasured: 1), within
/// `SPEED_RANGE` so that a slow worker keeps a share and goes on being measured; or why the
/// step goes over the star. (Other workers stand by: their tensors would cross the
/// coordinator's link.) Groups never change a bit of the sum, which is in shard order whoever
/// computes which shard.
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
    let present = candidates.iter().filter(|c| !excluded.contains(&c.id));
    let able: Vec<&Candidate> = present.clone().filter(|c| c.peer.is_some() && !c.shared_memory).collect();
    let tail: Vec<WorkerId> = present.filter(|c| c.shared_memory).map(|c| c.id).collect();
    let ids: Vec<WorkerId> = able.iter().map(|c| c.id).chain(tail.iter().copied()).collect();
    let todo: Vec<ShardIndex> = (0..shards).map(ShardIndex).collect();
    let (low, high) = SPEED_RANGE;
    let speed = |id: &WorkerId| speeds.get(id).copied().filter(|s| s.is_finite()).map_or(1.0, |s| s.clamp(low, high));
    // Ties go to the later members, then to the tail: a member early in the chain passes the
    // sum on sooner, and is idle sooner for a copy of a late tail shard.
    let order: Vec<usize> = (0..able.len()).rev().chain(able.len()..ids.len()).collect();
    let weights: Vec<f64> = order.iter().map(|&i| speed(&ids[i])).collect();
    let mut sizes = vec![0; ids.len()];
    for (&i, n) in order.iter().zip(group_sizes(todo.len(), &weights)) {
        sizes[i] = n;
    }
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
            let (group, rest_after) = rest.split_at(n.min(rest.len()));
            rest = rest_after;
            (id, group.to_vec())
        })
        .filter(|(_, group)| !group.is_empty())
        .collect();
    let (tail, groups): (Vec<_>, Vec<_>) = groups.into_iter().partition(|(id, _)| tail.contains(id));
    if groups.is_empty() {
        return Err(StarBecause::NoMember);
    }
    let peer = |id: WorkerId| able.iter().find(|c| c.id == id).and_then(|c| c.peer.clone()).unwrap_or_default();
    let members = groups.into_iter().map(|(id, shards)| Link { id, peer: peer(id), shards }).collect();
    Ok(ChainPlan { members, tail })
}

/// Copies of a chain step's late tail shards: each shard of a tail worker past its time
/// (`due`) that is not `in_` and has no copy yet (`copies`, shard to holder) goes to an idle
/// worker, one each, in shard order. Idle: every shard it computes this step is in, and it
/// holds no copy. The first result of a shard wins; both have the same bits.
pub fn tail_copies(
    plan: &ChainPlan,
    due: &BTreeMap<WorkerId, Instant>,
    now: Instant,
    in_: &dyn Fn(ShardIndex) -> bool,
    copies: &BTreeMap<ShardIndex, WorkerId>,
) -> Vec<(ShardIndex, WorkerId)> {
    let late = plan.tail.iter().filter(|(w, _)| due.get(w).is_some_and(|&t| t <= now));
    let wanted = late.flat_map(|(_, ks)| ks.iter().copied()).filter(|k| !in_(*k) && !copies.contains_key(k));
    wanted.zip(idle(plan, in_, copies)).collect()
}

/// Copies of a late chain of one's shards: once the sum is `late`, each of the member's shards
/// that has no copy yet goes to an idle worker, one each, in shard order. Only a chain of one:
/// its sum is its own shards' sum from zero, so copies computed elsewhere can stand in for it
/// whole (a later member's sum starts from its predecessor's, which only it has). `in_`: a
/// shard's result (the member's, or a copy's) is in.
pub fn member_copies(
    plan: &ChainPlan,
    late: bool,
    in_: &dyn Fn(ShardIndex) -> bool,
    copies: &BTreeMap<ShardIndex, WorkerId>,
) -> Vec<(ShardIndex, WorkerId)> {
    let [member] = &plan.members[..] else { return vec![] };
    if !late {
        return vec![];
    }
    let wanted = member.shards.iter().copied().filter(|k| !copies.contains_key(k));
    wanted.zip(idle(plan, in_, copies).filter(|&w| w != member.id)).collect()
}

/// The workers of `plan` free for a copy: every shard they compute this step is in, and they
/// hold no copy that is not.
fn idle<'a>(
    plan: &'a ChainPlan,
    in_: &'a dyn Fn(ShardIndex) -> bool,
    copies: &BTreeMap<ShardIndex, WorkerId>,
) -> impl Iterator<Item = WorkerId> + 'a {
    let holding: BTreeSet<WorkerId> = copies.iter().filter(|(&k, _)| !in_(k)).map(|(_, &w)| w).collect();
    let everyone = plan.members.iter().map(|m| m.id).chain(plan.tail.iter().map(|&(w, _)| w));
    everyone.filter(move |&w| !holding.contains(&w) && plan.shards_of(w).iter().all(|&k| in_(k)))
}

/// When each tail worker of `plan` is late: `per_shard` (the learned time a shard may take)
/// for each of its shards, from `sent` (when the step's work went out).
pub fn tail_due(plan: &ChainPlan, sent: Instant, per_shard: Duration) -> BTreeMap<WorkerId, Instant> {
    plan.tail.iter().map(|(w, ks)| (*w, sent + per_shard * ks.len() as u32)).collect()
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
        assert_eq!(p.tail, [(WorkerId(1), vec![ShardIndex(3)])]);
        assert_eq!(p.tail_owner(ShardIndex(3)), Some(WorkerId(1)));
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
    fn the_star_when_chosen_or_with_no_member() {
        let none = BTreeSet::new();
        let two = [remote(1), remote(2)];
        assert_eq!(plan(Topology::Star, &two, &none, 4, &BTreeMap::new()), Err(StarBecause::Chosen));
        let hidden = Candidate { id: WorkerId(2), peer: None, shared_memory: false };
        let local = Candidate { id: WorkerId(3), peer: Some("127.0.0.1:1".into()), shared_memory: true };
        assert_eq!(plan(Topology::Chain, &[hidden], &none, 4, &BTreeMap::new()), Err(StarBecause::NoMember));
        assert_eq!(plan(Topology::Auto, &[local], &none, 4, &BTreeMap::new()), Err(StarBecause::NoMember));
        let excluded = BTreeSet::from([WorkerId(1)]);
        assert_eq!(plan(Topology::Auto, &two[..1], &excluded, 4, &BTreeMap::new()), Err(StarBecause::NoMember));
        assert_eq!(Topology::parse("chain"), Ok(Topology::Chain));
        assert!(Topology::parse("ring").is_err());
    }

    #[test]
    fn one_member_is_a_chain_that_sums_its_shards_before_they_travel() {
        let none = BTreeSet::new();
        let shards = |p: &ChainPlan, w: u32| p.shards_of(WorkerId(w)).iter().map(|k| k.0).collect::<Vec<_>>();
        // Alone, it computes every shard and sends their sum.
        let p = plan(Topology::Auto, &[remote(1)], &none, 4, &BTreeMap::new()).unwrap();
        assert_eq!((p.members.len(), shards(&p, 1), p.last()), (1, vec![0, 1, 2, 3], WorkerId(1)));
        // Beside a worker that peers cannot reach: that one stands by, as in any chain.
        let hidden = Candidate { id: WorkerId(2), peer: None, shared_memory: false };
        let p = plan(Topology::Auto, &[remote(1), hidden], &none, 4, &BTreeMap::new()).unwrap();
        assert_eq!((shards(&p, 1), shards(&p, 2)), (vec![0, 1, 2, 3], vec![]));
        // Beside a worker on the coordinator's shared memory: the first shards on the member,
        // the last in the tail.
        let local = Candidate { id: WorkerId(3), peer: None, shared_memory: true };
        let p = plan(Topology::Auto, &[remote(1), local], &none, 4, &BTreeMap::new()).unwrap();
        assert_eq!(
            (shards(&p, 1), p.tail.clone()),
            (vec![0, 1], vec![(WorkerId(3), vec![ShardIndex(2), ShardIndex(3)])])
        );
        // One shard for two members: the later one takes it (ties go late), a chain of one.
        let p = plan(Topology::Auto, &[remote(1), remote(2)], &none, 1, &BTreeMap::new()).unwrap();
        assert_eq!(p.members.iter().map(|m| m.id.0).collect::<Vec<_>>(), [2]);
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

    #[test]
    fn a_slow_worker_is_benched_ever_longer() {
        let speeds = |s: &[(u32, f64)]| s.iter().map(|&(w, x)| (WorkerId(w), x)).collect::<BTreeMap<_, _>>();
        let live: BTreeSet<WorkerId> = (1..=4).map(WorkerId).collect();
        let mut bench = Bench::default();
        let measured = speeds(&[(1, 1.0), (2, 0.59), (3, 0.6), (4, f64::NAN)]);
        assert_eq!(bench.update(10, &measured, &live), (vec![WorkerId(2)], vec![]));
        assert_eq!(bench.benched(), BTreeSet::from([WorkerId(2)]));
        // Still slow by what was learned: benched, not benched again; served after 16 steps.
        assert_eq!(bench.update(25, &measured, &live), (vec![], vec![]));
        assert_eq!(bench.update(26, &measured, &live), (vec![], vec![WorkerId(2)]));
        assert!(bench.benched().is_empty());
        // Slow again once measured anew: twice as long.
        assert_eq!(bench.update(30, &speeds(&[(2, 0.3)]), &live), (vec![WorkerId(2)], vec![]));
        assert_eq!(bench.update(61, &BTreeMap::new(), &live), (vec![], vec![]));
        assert_eq!(bench.update(62, &BTreeMap::new(), &live), (vec![], vec![WorkerId(2)]));
        // A worker that left is forgotten, its record too.
        bench.update(70, &speeds(&[(2, 0.3)]), &live);
        bench.update(71, &BTreeMap::new(), &BTreeSet::new());
        assert_eq!(bench, Bench::default());
    }

    #[test]
    fn benched_workers_stand_by_on_the_chain_and_in_its_tail() {
        let local = Candidate { id: WorkerId(9), peer: None, shared_memory: true };
        let all = [remote(1), remote(2), remote(3), local];
        let p = plan(Topology::Auto, &all, &BTreeSet::from([WorkerId(2), WorkerId(9)]), 6, &BTreeMap::new()).unwrap();
        assert_eq!(p.members.iter().map(|m| (m.id.0, m.shards.len())).collect::<Vec<_>>(), [(1, 3), (3, 3)]);
        assert!(p.tail.is_empty());
        let p = plan(Topology::Auto, &all, &BTreeSet::new(), 7, &BTreeMap::new()).unwrap();
        let sizes: Vec<usize> = [1, 2, 3, 9].iter().map(|&w| p.shards_of(WorkerId(w)).len()).collect();
        assert_eq!(sizes, [2, 2, 2, 1], "the shard left over goes to members before the tail");
        assert_eq!(p.shards_of(WorkerId(9)), [ShardIndex(6)]);
        assert!(p.shards_of(WorkerId(7)).is_empty());
        // Two remote workers, one benched: the other is a chain of one; both benched: the star.
        let p = plan(Topology::Auto, &all[..2], &BTreeSet::from([WorkerId(2)]), 4, &BTreeMap::new()).unwrap();
        assert_eq!(p.members.iter().map(|m| (m.id.0, m.shards.len())).collect::<Vec<_>>(), [(1, 4)]);
        let both = BTreeSet::from([WorkerId(1), WorkerId(2)]);
        assert_eq!(plan(Topology::Auto, &all[..2], &both, 4, &BTreeMap::new()), Err(StarBecause::NoMember));
    }

    #[test]
    fn a_late_chain_of_one_gets_copies_of_its_shards_on_idle_workers() {
        let local = |id| Candidate { id: WorkerId(id), peer: None, shared_memory: true };
        let p = plan(Topology::Chain, &[remote(1), local(2), local(3)], &BTreeSet::new(), 6, &BTreeMap::new()).unwrap();
        assert_eq!(p.shards_of(WorkerId(1)), [ShardIndex(0), ShardIndex(1)]);
        let none = BTreeMap::new();
        let only = |ks: &'static [usize]| move |k: ShardIndex| ks.contains(&k.0);
        // Not late: nothing; late, but the tail still computes: nothing.
        assert!(member_copies(&p, false, &only(&[2, 3, 4, 5]), &none).is_empty());
        assert!(member_copies(&p, true, &only(&[2, 4]), &none).is_empty());
        // One tail worker done: it takes the first shard; both done: one shard each.
        assert_eq!(member_copies(&p, true, &only(&[2, 3, 4]), &none), [(ShardIndex(0), WorkerId(2))]);
        let both = member_copies(&p, true, &only(&[2, 3, 4, 5]), &none);
        assert_eq!(both, [(ShardIndex(0), WorkerId(2)), (ShardIndex(1), WorkerId(3))]);
        // A holder takes no second copy until its first is in.
        let held = BTreeMap::from([(ShardIndex(0), WorkerId(2))]);
        assert!(member_copies(&p, true, &only(&[2, 3, 4]), &held).is_empty());
        assert_eq!(member_copies(&p, true, &only(&[2, 3, 4, 5]), &held), [(ShardIndex(1), WorkerId(3))]);
        assert_eq!(member_copies(&p, true, &only(&[0, 2, 3, 4]), &held), [(ShardIndex(1), WorkerId(2))]);
        // Not in a longer chain: its later members' sums start from their predecessors'.
        let two = plan(Topology::Chain, &[remote(1), remote(4), local(2)], &BTreeSet::new(), 6, &BTreeMap::new());
        assert!(member_copies(&two.unwrap(), true, &only(&[4, 5]), &none).is_empty());
    }

    #[test]
    fn a_late_tail_shard_gets_one_copy_on_a_worker_whose_own_shards_are_in() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let local = Candidate { id: WorkerId(3), peer: None, shared_memory: true };
        let p = plan(Topology::Chain, &[remote(1), remote(2), local], &BTreeSet::new(), 5, &BTreeMap::new()).unwrap();
        assert_eq!(p.tail, [(WorkerId(3), vec![ShardIndex(4)])]);
        assert_eq!(p.shards_of(WorkerId(1)), [ShardIndex(0), ShardIndex(1)]);
        let due = tail_due(&p, t0, ms(10));
        assert_eq!(due[&WorkerId(3)], t0 + ms(10), "10 ms for its one shard");
        let none = BTreeMap::new();
        let only = |ks: &'static [usize]| move |k: ShardIndex| ks.contains(&k.0);
        // Not late yet; then late, but every member is still busy.
        assert!(tail_copies(&p, &due, t0 + ms(9), &only(&[0, 1, 2, 3]), &none).is_empty());
        assert!(tail_copies(&p, &due, t0 + ms(10), &only(&[0, 2]), &none).is_empty());
        // The first member is done: it takes the copy.
        let got = tail_copies(&p, &due, t0 + ms(10), &only(&[0, 1]), &none);
        assert_eq!(got, [(ShardIndex(4), WorkerId(1))]);
        // Copied already, or in: nothing more.
        let copied = BTreeMap::from([(ShardIndex(4), WorkerId(1))]);
        assert!(tail_copies(&p, &due, t0 + ms(20), &only(&[0, 1, 2, 3]), &copied).is_empty());
        assert!(tail_copies(&p, &due, t0 + ms(20), &only(&[0, 1, 2, 3, 4]), &none).is_empty());
    }
}
