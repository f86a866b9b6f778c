//! Types and pure logic shared by bond's kernel programs and its agent.
//!
//! Everything here is `no_std` and panic-free so the eBPF programs can use
//! it; the `user` feature adds `aya::Pod` impls for the map types. Every
//! function is unit-tested on the host.
#![cfg_attr(not(any(feature = "user", test)), no_std)]

pub mod csum;
pub mod drops;
pub mod edpf;
pub mod frag;
pub mod maps;
pub mod wire;
