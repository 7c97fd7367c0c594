//! Every initializer's distribution against Keras 3.15.1's (fixtures/keras_init.json, from
//! gen_keras_init.py): the random streams differ, so one draw of a 300x200 kernel each is
//! compared by mean (within 5 standard errors), standard deviation (2%) and range (the same
//! bounds, reached to within 2% of the range; truncation at two standard deviations included).

use dtrain_nn::rng::Stream;
use dtrain_nn::Initializer;
use serde_json::Value;

fn initializer(case: &Value) -> Initializer {
    let arg = |k: &str| case["args"][k].as_f64().unwrap() as f32;
    match case["name"].as_str().unwrap() {
        "RandomNormal" => Initializer::RandomNormal { mean: arg("mean"), stddev: arg("stddev") },
        "RandomUniform" => Initializer::RandomUniform { minval: arg("minval"), maxval: arg("maxval") },
        "TruncatedNormal" => Initializer::TruncatedNormal { mean: arg("mean"), stddev: arg("stddev") },
        "Constant" => Initializer::Constant { value: arg("value") },
        name => Initializer::from_name(name).unwrap_or_else(|| panic!("{name} is a Keras initializer name")),
    }
}

#[test]
fn every_initializer_draws_from_keras_distribution() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/keras_init.json");
    let fixture: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let cases = fixture["initializers"].as_array().unwrap();
    assert_eq!(cases.len(), 15, "every name and every table form");
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let init = initializer(case);
        let (fan_in, fan_out) = (case["fan_in"].as_u64().unwrap() as usize, case["fan_out"].as_u64().unwrap() as usize);
        let mut v = vec![0.0f32; fan_in * fan_out];
        init.fill(&mut v, fan_in, fan_out, &mut Stream::new(21, 4));
        let n = v.len() as f64;
        let mean = v.iter().map(|&x| f64::from(x)).sum::<f64>() / n;
        let std = (v.iter().map(|&x| (f64::from(x) - mean).powi(2)).sum::<f64>() / n).sqrt();
        let min = v.iter().fold(f64::INFINITY, |m, &x| m.min(f64::from(x)));
        let max = v.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(f64::from(x)));
        let k = |key: &str| case[key].as_f64().unwrap();
        let (k_mean, k_std, k_min, k_max) = (k("mean"), k("std"), k("min"), k("max"));
        if k_std == 0.0 {
            assert!(v.iter().all(|&x| x == k_mean as f32), "{name}: a constant");
            continue;
        }
        // Means of two independent draws differ by less than 5 standard errors of their difference.
        assert!((mean - k_mean).abs() < 5.0 * k_std * (2.0 / n).sqrt(), "{name}: mean {mean} vs keras {k_mean}");
        assert!((std / k_std - 1.0).abs() < 0.02, "{name}: stddev {std} vs keras {k_std}");
        if matches!(init, Initializer::RandomNormal { .. }) {
            // Unbounded: extremes of 60,000 normals lie between 3.5 and 5.5 standard deviations.
            for (got, what) in [((mean - min) / std, "min"), ((max - mean) / std, "max")] {
                assert!((3.5..5.5).contains(&got), "{name}: {what} at {got} standard deviations");
            }
        } else {
            // Bounded (uniform, or normal truncated at two standard deviations): the same bounds.
            let range = k_max - k_min;
            assert!(
                min >= k_min - 0.02 * range && max <= k_max + 0.02 * range,
                "{name}: [{min}, {max}] vs keras [{k_min}, {k_max}]"
            );
            assert!(
                min <= k_min + 0.02 * range && max >= k_max - 0.02 * range,
                "{name}: [{min}, {max}] vs keras [{k_min}, {k_max}]"
            );
        }
    }
}
