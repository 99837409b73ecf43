//! Sliding windows: `[k*slide, k*slide+size)` for every k whose window holds ts.

/// The windows holding `ts`, oldest first, as (start, end).
pub fn assign(ts: i64, size: i64, slide: i64) -> impl Iterator<Item = (i64, i64)> {
    let last = ts.div_euclid(slide);
    let first = (ts - size).div_euclid(slide) + 1;
    (first..=last).map(move |k| (k * slide, k * slide + size))
}

/// Late only when every window holding it has fired: the newest one's end
/// is at or below the watermark.
pub fn is_late(ts: i64, size: i64, slide: i64, watermark: Option<i64>) -> bool {
    let newest_end = ts.div_euclid(slide) * slide + size;
    watermark.is_some_and(|wm| wm >= newest_end)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_window_that_holds_ts() {
        assert_eq!(assign(12, 10, 5).collect::<Vec<_>>(), vec![(5, 15), (10, 20)]);
        assert_eq!(assign(10, 10, 5).collect::<Vec<_>>(), vec![(5, 15), (10, 20)]);
        assert_eq!(assign(9, 10, 5).collect::<Vec<_>>(), vec![(0, 10), (5, 15)]);
        assert_eq!(assign(3, 10, 10).collect::<Vec<_>>(), vec![(0, 10)]);
        assert_eq!(assign(-1, 10, 5).collect::<Vec<_>>(), vec![(-10, 0), (-5, 5)]);
        assert_eq!(assign(7, 9, 3).collect::<Vec<_>>(), vec![(0, 9), (3, 12), (6, 15)]);
    }

    #[test]
    fn late_only_when_all_windows_fired() {
        assert!(!is_late(12, 10, 5, Some(15)), "(10,20) is still open");
        assert!(is_late(12, 10, 5, Some(20)));
        assert!(!is_late(12, 10, 5, None));
    }
}
