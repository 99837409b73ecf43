//! Tumbling windows: fixed `size`, epoch-aligned, `[floor(ts/size)*size, +size)`.

/// The one window holding `ts`, as (start, end).
pub fn assign(ts: i64, size: i64) -> (i64, i64) {
    let start = ts.div_euclid(size) * size;
    (start, start + size)
}

/// Late when its window has fired, i.e. the watermark reached its end.
pub fn is_late(ts: i64, size: i64, watermark: Option<i64>) -> bool {
    watermark.is_some_and(|wm| wm >= assign(ts, size).1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_are_half_open_and_epoch_aligned() {
        assert_eq!(assign(0, 10), (0, 10));
        assert_eq!(assign(9, 10), (0, 10));
        assert_eq!(assign(10, 10), (10, 20), "ts == end belongs to the next window");
        assert_eq!(assign(-1, 10), (-10, 0));
        assert_eq!(assign(1_700_000_012_345, 60_000), (1_699_999_980_000, 1_700_000_040_000));
    }
}
