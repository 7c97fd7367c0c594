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
    if alive.is_empty() {
        return (vec![], todo.to_vec());
    }
    let (base, longer) = (todo.len() / alive.len(), todo.len() % alive.len());
    // Position i's group: the `longer` groups of base + 1 come first, then groups of base.
    let group = |i: usize| match i.checked_sub(longer * (base + 1)) {
        None => i / (base + 1),
        Some(rest) => longer + rest / base.max(1),
    };
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
}
