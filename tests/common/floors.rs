//! The throughput floors of the end-to-end tests, in one place, each with
//! what it was measured at when it was set (release build, this project's
//! 2-core VM, `cargo xtask test`, 2026-12-03). They sit about a fifth under
//! the measurement: a test that falls below one has lost a real part of
//! the bonding, not a few percent to a busy machine. The benchmarks'
//! floors are in `xtask/src/floors.rs`.
#![allow(dead_code)]

/// Figure 1 (10 + 20 + 30 Mbit/s), an HTTP download from t3, which has no
/// link: measured 55.1 Mbit/s.
pub const FIGURE1_HTTP_MBIT: f64 = 45.0;
/// Figure 1, one iperf3 TCP flow each way from t3: measured 55.2 up and
/// 55.3 down.
pub const FIGURE1_TCP_MBIT: f64 = 45.0;
/// Figure 1, one `iperf3 -6` TCP flow each way from t3 (members' IPv6
/// through `bond_server6`): measured 54.5 down and 50.8-53.5 up, as IPv4.
pub const FIGURE1_IPV6_TCP_MBIT: f64 = 45.0;
/// Figure 1: each link carries at least this share of its rate in those
/// flows (measured 0.97-0.98).
pub const FIGURE1_LINK_SHARE: f64 = 0.8;
/// One host with two 10 Mbit/s links: measured 18.3.
pub const TWO_LINKS_MBIT: f64 = 15.0;
/// `mixed` (10 + 20 + 40), one TCP flow each way: measured 61.7-62.1; the
/// best link is 40.
pub const MIXED_TCP_MBIT: f64 = 50.0;
/// `lte` (20 + 30 + 40 with jitter, loss, rate steps), one TCP flow down:
/// measured 65.6 here, 48-58 in the benchmark's runs (its cells scatter
/// by a fifth); the best link is 30.
pub const LTE_DOWN_MBIT: f64 = 40.0;
/// `lte`, one TCP flow up: measured 35.9 (48-50 in the benchmark's runs).
pub const LTE_UP_MBIT: f64 = 30.0;
/// `mixed`, two origins uploading at once, together: measured 60.3 of 70.
pub const TWO_ORIGINS_MBIT: f64 = 48.0;
/// `flap`, the goodput while link 1 is dark as a share of that before it:
/// measured 0.68 up (35.7 of 52.6) and 0.72 down (34.8 of 48.2); the two
/// links left carry two thirds of the sum.
pub const FLAP_DARK_SHARE: f64 = 0.5;
