//! Out-of-order appends against a model: whatever order samples come in, the
//! store holds exactly the samples the window lets in, in time order, before
//! and after reopening.

use std::collections::BTreeMap;

use capstan_tsdb::{Db, Fsync, Labels, Matcher, Options};
use proptest::prelude::*;

const WINDOW: i64 = 50;

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]
    #[test]
    fn the_store_agrees_with_a_model(
        batches in proptest::collection::vec(
            proptest::collection::vec((0i64..400, 0u8..3), 1..8),
            1..40,
        )
    ) {
        let dir = tempfile::tempdir().unwrap();
        let mut o = Options::new(dir.path());
        o.fsync = Fsync::Never;
        o.out_of_order_window_ms = WINDOW;
        let (db, _) = Db::open(o.clone()).unwrap();
        let l = Labels::from_pairs([("__name__", "x")]);
        let mut model: BTreeMap<i64, f64> = BTreeMap::new();
        for batch in &batches {
            let mut a = db.appender();
            for &(t, v) in batch {
                a.add(l.clone(), t, f64::from(v));
                let max = model.keys().next_back().copied();
                let ok = match max {
                    None => true,
                    Some(m) => t > m || (t >= m - WINDOW && !model.contains_key(&t)),
                };
                if ok {
                    model.insert(t, f64::from(v));
                }
            }
            a.commit().unwrap();
        }
        let read = |db: &Db| -> Vec<(i64, f64)> {
            db.select(&[Matcher::eq("__name__", "x")], i64::MIN, i64::MAX)
                .first()
                .map(|s| s.samples().collect())
                .unwrap_or_default()
        };
        let want: Vec<(i64, f64)> = model.into_iter().collect();
        prop_assert_eq!(read(&db), want.clone());
        drop(db);
        let (db, _) = Db::open(o).unwrap();
        prop_assert_eq!(read(&db), want);
    }
}
