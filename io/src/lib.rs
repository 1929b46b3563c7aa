//! I/O that the scheduler and the worker share: the signals that stop them, their settings from
//! flags and environment variables, how both reach RabbitMQ and declare its queues, how both
//! listen on a Redis pub/sub channel and reserve rate-limited starts in Redis, and the sandbox
//! processes that run the jq programs neither may run on its own threads, the recorder of their
//! Prometheus metrics, their log subscriber (text or JSON lines) and their span exporter (OTLP).
//!
//! This crate owns mechanics only. It knows nothing of runs, tasks or the database, and decides
//! nothing about what is published or what a message means; the vocabulary (queue and channel
//! names, messages) stays in `taskfleet-common`, which does no I/O.

pub mod amqp;
pub mod jq_sandbox;
pub mod logging;
pub mod metrics;
pub mod pubsub;
pub mod rate_limits;
pub mod redis_connection;
pub mod settings;
pub mod signals;
pub mod spans;
pub mod tls;
