//! framecast-bench: the load client for framecast's compositor and any KServe v2 inference
//! server, and the demo client. The binary is a thin CLI over these modules, so tests drive
//! the same code against real servers.

pub mod avi;
pub mod charts;
pub mod client;
pub mod demo;
pub mod gateway;
pub mod load;
pub mod report;
pub mod speech;
pub mod stats;
pub mod target;
