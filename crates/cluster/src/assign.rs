//! Which live worker computes which of a step's pending shards.

use std::collections::BTreeMap;

/// Contiguous groups of `todo`, one per worker of `alive` (in order), except that a shard
/// `avoid` names a worker for goes to the next worker if there is another: a result that
/// needs a second opinion gets it from someone else. Returns only non-empty groups.
pub fn assign(todo: &[usize], alive: &[u32], avoid: impl Fn(usize) -> Option<u32>) -> Vec<(u32, Vec<usize>)> {
    if alive.is_empty() {
        return vec![];
    }
    let per = todo.len().div_ceil(alive.len()).max(1);
    let mut plan: Vec<(u32, Vec<usize>)> = alive.iter().map(|&id| (id, vec![])).collect();
    for (i, &k) in todo.iter().enumerate() {
        let mut w = i / per;
        if alive.len() > 1 && avoid(k) == Some(alive[w]) {
            w = (w + 1) % alive.len();
        }
        plan[w].1.push(k);
    }
    plan.retain(|(_, group)| !group.is_empty());
    plan
}

/// Removes and returns the shards assigned to worker `id`.
pub fn take_assigned(assigned: &mut BTreeMap<usize, u32>, id: u32) -> Vec<usize> {
    let lost: Vec<usize> = assigned.iter().filter(|(_, &w)| w == id).map(|(&k, _)| k).collect();
    assigned.retain(|_, w| *w != id);
    lost
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contiguous_groups_and_second_opinions_from_someone_else() {
        let none = |_| None;
        assert_eq!(assign(&[0, 1, 2, 3], &[7, 9], none), vec![(7, vec![0, 1]), (9, vec![2, 3])]);
        assert_eq!(assign(&[0, 1, 2, 3], &[4, 5, 6], none), vec![(4, vec![0, 1]), (5, vec![2, 3])]);
        assert_eq!(assign(&[2], &[4, 5], none), vec![(4, vec![2])]);
        assert_eq!(assign(&[2], &[], none), vec![]);
        // Shard 2's first result came from worker 4: worker 5 checks it.
        assert_eq!(assign(&[2], &[4, 5], |k| (k == 2).then_some(4)), vec![(5, vec![2])]);
        assert_eq!(assign(&[0, 1], &[4, 5], |k| (k == 1).then_some(5)), vec![(4, vec![0, 1])]);
        // Alone, a worker gives the second opinion itself.
        assert_eq!(assign(&[2], &[4], |_| Some(4)), vec![(4, vec![2])]);
    }

    #[test]
    fn take_assigned_takes_only_that_workers_shards() {
        let mut a = BTreeMap::from([(0, 4), (1, 5), (2, 4)]);
        assert_eq!(take_assigned(&mut a, 4), vec![0, 2]);
        assert_eq!(a, BTreeMap::from([(1, 5)]));
    }
}
