//! Node integration tests, one binary: real `griddle` processes on loopback, real RocksDB.

mod api;
mod authz;
mod crash;
mod damage;
mod flood;
mod harness;
mod mesh;
mod ops;
mod replication;
