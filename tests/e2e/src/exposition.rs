//! Reading a Prometheus text exposition's samples, for the tests that check what the figures say.

use std::collections::BTreeMap;

/// The samples of a text exposition: (name, labels) → value.
pub fn samples(body: &str) -> BTreeMap<(String, BTreeMap<String, String>), f64> {
    let mut samples = BTreeMap::new();
    for line in body.lines().filter(|line| !line.starts_with('#') && !line.trim().is_empty()) {
        let Some((series, value)) = line.rsplit_once(' ') else { continue };
        let Ok(value) = value.parse::<f64>() else { continue };
        let (name, labels) = match series.split_once('{') {
            Some((name, labels)) => (name, labels.trim_end_matches('}')),
            None => (series, ""),
        };
        // Switchboard's label values are ids and codes: no commas or quotes inside them.
        let labels = labels
            .split(',')
            .filter_map(|pair| pair.split_once('='))
            .map(|(key, value)| (key.to_owned(), value.trim_matches('"').to_owned()))
            .collect();
        samples.insert((name.to_owned(), labels), value);
    }
    samples
}

/// The sum of `name` over the samples whose labels include every one of `with`.
pub fn total(body: &str, name: &str, with: &[(&str, &str)]) -> f64 {
    samples(body)
        .iter()
        .filter(|((sample, labels), _)| {
            sample == name && with.iter().all(|(key, value)| labels.get(*key).map(String::as_str) == Some(*value))
        })
        .map(|(_, value)| value)
        // A sum of nothing is -0.0: 0 reads better in a failure.
        .sum::<f64>()
        + 0.0
}
