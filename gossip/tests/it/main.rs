//! Gossip tests, one binary: the membership machine on a fake clock and an in-memory
//! network (no sleeps), and real QUIC endpoints with mutual TLS on loopback.

mod membership;
mod quic;
