//! The floors the benchmarks' headline ratios are held to: the one place
//! they are written. `cargo xtask bench` compares every figure it measured
//! with its floor, writes the comparison into the report, and fails when
//! one falls below, so that a large regression does not land green (CI
//! runs `bench --quick`). They are generous: a quick run is one short
//! sample on a shared machine, and the floor is there to catch a datapath
//! that stopped bonding, not a few percent.

/// A figure a suite measured, by name.
#[derive(Clone, Debug)]
pub struct Figure {
    pub name: String,
    pub value: f64,
}

struct Floor {
    figure: &'static str,
    min: f64,
    /// What it was measured at when the floor was set (quick runs).
    measured: &'static str,
}

const FLOORS: &[Floor] = &[
    Floor {
        figure: "aggregate equal: bond / best single link, 1 flow down",
        min: 1.5,
        measured: "2.8-2.9x",
    },
    Floor {
        figure: "aggregate equal: bond / best single link, 1 flow up",
        min: 1.5,
        measured: "2.8-2.9x",
    },
    Floor {
        figure: "aggregate mixed: bond / best single link, 1 flow down",
        min: 1.2,
        measured: "1.5-1.6x",
    },
    Floor {
        figure: "aggregate mixed: bond / best single link, 8 flows down",
        min: 1.2,
        measured: "1.6x",
    },
    Floor {
        figure: "aggregate mixed: bond / MPTCP, 1 flow down",
        min: 0.75,
        measured: "0.92-0.98x",
    },
    Floor {
        figure: "aggregate mixed: bond IPv6 / IPv4, 8 flows down",
        min: 0.8,
        measured: "0.98x",
    },
    Floor {
        figure: "aggregate mixed: bond IPv6 / IPv4, 1 flow up",
        min: 0.8,
        measured: "1.00x",
    },
];

/// The report's section on the floors, and the figures below theirs.
pub fn judge(figures: &[Figure]) -> (String, Vec<String>) {
    let mut table = String::from(
        "Each headline ratio against its floor (`xtask/src/floors.rs`); a figure below its \
         floor fails the run.\n\n| figure | measured | floor | |\n|---|---|---|---|\n",
    );
    let mut below = Vec::new();
    for f in FLOORS {
        let got = figures.iter().find(|g| g.name == f.figure);
        let (value, verdict) = match got {
            None => ("not measured".to_string(), ""),
            Some(g) if g.value >= f.min => (format!("{:.2}x", g.value), "ok"),
            Some(g) => {
                below.push(format!(
                    "{}: {:.2}x, below its floor of {:.2}x (measured at {} when it was set)",
                    f.figure, g.value, f.min, f.measured
                ));
                (format!("{:.2}x", g.value), "**below**")
            }
        };
        table.push_str(&format!(
            "| {} | {value} | {:.2}x | {verdict} |\n",
            f.figure, f.min
        ));
    }
    (table, below)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fig(name: &str, value: f64) -> Figure {
        Figure {
            name: name.into(),
            value,
        }
    }

    #[test]
    fn a_figure_below_its_floor_is_named_and_the_rest_pass() {
        let (table, below) = judge(&[
            fig("aggregate equal: bond / best single link, 1 flow down", 1.4),
            fig("aggregate mixed: bond / best single link, 1 flow down", 1.6),
        ]);
        assert_eq!(below.len(), 1, "{below:?}");
        assert!(below[0].contains("equal") && below[0].contains("1.40x"));
        assert!(table.contains("| 1.60x | 1.20x | ok |"), "{table}");
        assert!(table.contains("not measured"), "{table}");
    }

    #[test]
    fn every_floor_names_a_figure_the_quick_aggregate_measures() {
        // The quick aggregate runs these profiles; a floor on another would
        // never be judged in CI.
        for f in FLOORS {
            assert!(
                ["equal", "mixed"]
                    .iter()
                    .any(|p| f.figure.starts_with(&format!("aggregate {p}:"))),
                "{}",
                f.figure
            );
        }
    }
}
