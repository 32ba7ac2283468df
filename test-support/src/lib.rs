//! Helpers the workspace's tests and benches share, so that each is written once: a real
//! `redis-server` on loopback ([`RedisServer`]).

mod redis;

pub use redis::{RedisCluster, RedisServer};
