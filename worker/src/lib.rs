//! The taskfleet worker: consumes tasks from RabbitMQ, runs dataflow (jq) and Python steps, and
//! reports completions. It keeps nothing durable and never talks to PostgreSQL, so workers scale
//! out without adding database connections.

pub mod broker;
pub mod config;
pub mod executor;
pub mod metrics;
pub mod report;
pub mod runner;

pub use config::Config;
pub use runner::{Executed, ExecutorSettings, Executors};
