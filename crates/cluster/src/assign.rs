//! Which live worker computes which of a step's pending shards.

use crate::ids::{ShardIndex, WorkerId};

/// Contiguous groups of `todo`, one per worker of `alive` (in order), as even as can be (the
/// first groups one longer when the count does not divide), except that a shard goes to the
/// next worker (cyclically) that is `eligible` for it when its own is not: a second copy of a
/// shard must come from someone else. Returns the non-empty groups, and the shards no live
/// worker is eligible for.
pub fn assign(
    todo: &[ShardIndex],
    alive: &[WorkerId],
    eligible: impl Fn(ShardIndex, WorkerId) -> bool,
) -> (Vec<(WorkerId, Vec<ShardIndex>)>, Vec<ShardIndex>) {
    assign_weighted(todo, alive, &vec![1.0; alive.len()], eligible)
}

/// `assign` with groups sized in proportion to `weights` (one per worker of `alive`, e.g. its
/// measured speed): each worker gets its share rounded down, and the shards left over go one
/// each to the largest remainders (the first on ties). Equal weights give `assign`'s groups.
pub fn assign_weighted(
    todo: &[ShardIndex],
    alive: &[WorkerId],
    weights: &[f64],
    eligible: impl Fn(ShardIndex, WorkerId) -> bool,
) -> (Vec<(WorkerId, Vec<ShardIndex>)>, Vec<ShardIndex>) {
    if alive.is_empty() {
        return (vec![], todo.to_vec());
    }
    let sizes = group_sizes(todo.len(), weights);
    let ends: Vec<usize> = sizes.iter().scan(0, |end, &n| Some(std::mem::replace(end, *end + n) + n)).collect();
    // Position i's group: the first whose end is past i.
    let group = |i: usize| ends.iter().position(|&end| i < end).unwrap_or(alive.len() - 1);
    let mut plan: Vec<(WorkerId, Vec<ShardIndex>)> = alive.iter().map(|&id| (id, vec![])).collect();
    let mut nobody = vec![];
    for (i, &k) in todo.iter().enumerate() {
        let first = group(i);
        match (0..alive.len()).map(|d| (first + d) % alive.len()).find(|&w| eligible(k, alive[w])) {
            Some(w) => plan[w].1.push(k),
            None => nobody.push(k),
        }
    }
    plan.retain(|(_, group)| !group.is_empty());
    (plan, nobody)
}

/// `n` split in proportion to `weights` (non-finite or negative weights count as 0; all 0:
/// equal): shares rounded down, then one more each to the largest remainders, first on ties.
pub(crate) fn group_sizes(n: usize, weights: &[f64]) -> Vec<usize> {
    let clean: Vec<f64> = weights.iter().map(|&w| if w.is_finite() && w > 0.0 { w } else { 0.0 }).collect();
    let total: f64 = clean.iter().sum();
    let clean = if total > 0.0 { clean } else { vec![1.0; weights.len()] };
    let total: f64 = clean.iter().sum();
    let shares: Vec<f64> = clean.iter().map(|w| w / total * n as f64).collect();
    let mut sizes: Vec<usize> = shares.iter().map(|s| (s.floor() as usize).min(n)).collect();
    let mut left = n.saturating_sub(sizes.iter().sum());
    let mut order: Vec<usize> = (0..sizes.len()).collect();
    order.sort_by(|&a, &b| (shares[b] - shares[b].floor()).total_cmp(&(shares[a] - shares[a].floor())).then(a.cmp(&b)));
    for i in order.into_iter().cycle().take(sizes.len() * 2) {
        if left == 0 {
            break;
        }
        sizes[i] += 1;
        left -= 1;
    }
    sizes
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ws(ids: &[u32]) -> Vec<WorkerId> {
        ids.iter().map(|&i| WorkerId(i)).collect()
    }

    fn ks(ks: &[usize]) -> Vec<ShardIndex> {
        ks.iter().map(|&k| ShardIndex(k)).collect()
    }

    fn plan(p: &[(u32, &[usize])]) -> Vec<(WorkerId, Vec<ShardIndex>)> {
        p.iter().map(|&(w, k)| (WorkerId(w), ks(k))).collect()
    }

    #[test]
    fn contiguous_groups_and_second_copies_from_someone_else() {
        let any = |_, _| true;
        let go = |todo: &[usize], alive: &[u32], eligible: &dyn Fn(ShardIndex, WorkerId) -> bool| {
            assign(&ks(todo), &ws(alive), eligible)
        };
        assert_eq!(go(&[0, 1, 2, 3], &[7, 9], &any), (plan(&[(7, &[0, 1]), (9, &[2, 3])]), vec![]));
        // Three workers, four shards: every worker computes.
        assert_eq!(go(&[0, 1, 2, 3], &[4, 5, 6], &any).0, plan(&[(4, &[0, 1]), (5, &[2]), (6, &[3])]));
        let seven = go(&[0, 1, 2, 3, 4, 5, 6], &[1, 2, 3], &any).0;
        assert_eq!(seven, plan(&[(1, &[0, 1, 2]), (2, &[3, 4]), (3, &[5, 6])]));
        assert_eq!(go(&[0, 1], &[1, 2, 3], &any).0, plan(&[(1, &[0]), (2, &[1])]));
        assert_eq!(go(&[2], &[4, 5], &any).0, plan(&[(4, &[2])]));
        assert_eq!(go(&[2], &[], &any), (vec![], ks(&[2])));
        // Worker 4 already has shard 2: worker 5 computes the second copy.
        let not = |w: u32, shard: usize| move |k: ShardIndex, x: WorkerId| !(k.0 == shard && x == WorkerId(w));
        assert_eq!(go(&[2], &[4, 5], &not(4, 2)).0, plan(&[(5, &[2])]));
        assert_eq!(go(&[0, 1], &[4, 5], &not(5, 1)).0, plan(&[(4, &[0, 1])]));
        // Alone, a worker cannot give a second opinion on its own result.
        assert_eq!(go(&[2], &[4], &not(4, 2)), (vec![], ks(&[2])));
    }

    #[test]
    fn groups_follow_the_workers_speeds() {
        let any = |_, _| true;
        let todo: Vec<ShardIndex> = (0..12).map(ShardIndex).collect();
        let (p, _) = assign_weighted(&todo, &ws(&[1, 2, 3]), &[1.0, 0.5, 1.0], any);
        let sizes: Vec<usize> = p.iter().map(|(_, g)| g.len()).collect();
        assert_eq!(sizes, [5, 2, 5], "shares 4.8, 2.4, 4.8");
        assert_eq!(p[1].1, ks(&[5, 6]), "contiguous, in order");
        // Equal weights are assign's even groups; bad weights count as none.
        assert_eq!(group_sizes(7, &[1.0, 1.0, 1.0]), [3, 2, 2]);
        assert_eq!(group_sizes(4, &[f64::NAN, 1.0]), [0, 4]);
        assert_eq!(group_sizes(4, &[0.0, 0.0]), [2, 2]);
        assert_eq!(group_sizes(1, &[1.0, 3.0]), [0, 1]);
        let (p, _) = assign_weighted(&todo[..4], &ws(&[1, 2]), &[1.0, 1e-9], any);
        assert_eq!(p, plan(&[(1, &[0, 1, 2, 3])]), "a very slow worker stands by");
    }
}
