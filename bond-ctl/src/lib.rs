//! bond-ctl: the bond agent and operator CLI, as a library so the tests
//! drive the datapath through the same calls the agent makes.

pub mod agent;
pub mod cache;
pub mod config;
pub mod control;
pub mod datapath;
pub mod dist;
pub mod ebpf;
pub mod feedback;
pub mod flows;
pub mod lab;
pub mod linkwatch;
pub mod membership;
pub mod net;
pub mod pathmon;
pub mod playout;
pub mod probe;
pub mod resend;
pub mod share;
pub mod show;
pub mod veth;
pub mod worker;
