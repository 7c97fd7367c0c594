//! Which live worker computes which of a step's pending shards.

use crate::ids::{ShardIndex, WorkerId};

/// Contiguous groups of `todo`, one per worker of `alive` (in order), as even as can be (the
/// first groups one longer when the count does not divide), except that a shard `avoid` names
/// a worker for goes to the next worker if there is another: a result that needs a second
/// opinion gets it from someone else. Returns only non-empty groups.
pub fn assign(
    todo: &[ShardIndex],
    alive: &[WorkerId],
    avoid: impl Fn(ShardIndex) -> Option<WorkerId>,
) -> Vec<(WorkerId, Vec<ShardIndex>)> {
    if alive.is_empty() {
        return vec![];
    }
    let (base, longer) = (todo.len() / alive.len(), todo.len() % alive.len());
    // Position i's group: the `longer` groups of base + 1 come first, then groups of base.
    let group = |i: usize| match i.checked_sub(longer * (base + 1)) {
        None => i / (base + 1),
        Some(rest) => longer + rest / base.max(1),
    };
    let mut plan: Vec<(WorkerId, Vec<ShardIndex>)> = alive.iter().map(|&id| (id, vec![])).collect();
    for (i, &k) in todo.iter().enumerate() {
        let mut w = group(i);
        if alive.len() > 1 && avoid(k) == Some(alive[w]) {
            w = (w + 1) % alive.len();
        }
        plan[w].1.push(k);
    }
    plan.retain(|(_, group)| !group.is_empty());
    plan
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
    fn contiguous_groups_and_second_opinions_from_someone_else() {
        let none = |_| None;
        assert_eq!(assign(&ks(&[0, 1, 2, 3]), &ws(&[7, 9]), none), plan(&[(7, &[0, 1]), (9, &[2, 3])]));
        // Three workers, four shards: every worker computes.
        assert_eq!(assign(&ks(&[0, 1, 2, 3]), &ws(&[4, 5, 6]), none), plan(&[(4, &[0, 1]), (5, &[2]), (6, &[3])]));
        let five = assign(&ks(&[0, 1, 2, 3, 4, 5, 6]), &ws(&[1, 2, 3]), none);
        assert_eq!(five, plan(&[(1, &[0, 1, 2]), (2, &[3, 4]), (3, &[5, 6])]));
        assert_eq!(assign(&ks(&[0, 1]), &ws(&[1, 2, 3]), none), plan(&[(1, &[0]), (2, &[1])]));
        assert_eq!(assign(&ks(&[2]), &ws(&[4, 5]), none), plan(&[(4, &[2])]));
        assert_eq!(assign(&ks(&[2]), &[], none), vec![]);
        // Shard 2's first result came from worker 4: worker 5 checks it.
        let from = |w: u32, shard: usize| move |k: ShardIndex| (k.0 == shard).then_some(WorkerId(w));
        assert_eq!(assign(&ks(&[2]), &ws(&[4, 5]), from(4, 2)), plan(&[(5, &[2])]));
        assert_eq!(assign(&ks(&[0, 1]), &ws(&[4, 5]), from(5, 1)), plan(&[(4, &[0, 1])]));
        // Alone, a worker gives the second opinion itself.
        assert_eq!(assign(&ks(&[2]), &ws(&[4]), from(4, 2)), plan(&[(4, &[2])]));
    }
}
