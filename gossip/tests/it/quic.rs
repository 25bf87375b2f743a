//! Real QUIC endpoints on loopback with mutual TLS.

use std::time::Duration;

use gossip::quic::{Mesh, MeshConfig};
use gossip::tls::{self, Credentials, Pem};
use gossip::{Identity, MemberState, NodeId, Profile};

#[allow(clippy::disallowed_methods)] // Tests of the real shell run on real time.
fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64
}

async fn start(name: &str, ca: &Pem, seeds: Vec<std::net::SocketAddr>) -> Mesh {
    start_with(name, ca, seeds, None).await
}

async fn start_with(
    name: &str,
    ca: &Pem,
    seeds: Vec<std::net::SocketAddr>,
    handler: Option<gossip::quic::Handler>,
) -> Mesh {
    let id = NodeId::new(name).unwrap();
    let credentials = Credentials { ca_cert: ca.cert.clone(), node: tls::issue(ca, &id).unwrap() };
    // Bind first to learn the port, so the identity can advertise it.
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let bind = socket.local_addr().unwrap();
    drop(socket);
    let identity = Identity { id, mesh_addr: bind, http_addr: bind, weight_milli: 1000, bump: now_ms() };
    let config =
        MeshConfig { identity, bind, seeds, profile: Profile::default(), credentials, clock: now_ms, seed: 7, handler };
    Mesh::start(config).await.unwrap()
}

async fn wait_for(mesh: &Mesh, alive: usize) -> bool {
    for _ in 0..100 {
        if mesh.members().iter().filter(|(_, s)| *s == MemberState::Alive).count() == alive {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_of_one_ca_join_and_a_foreign_ca_is_refused() {
    let ca = tls::dev_ca();
    let a = start("a", &ca, vec![]).await;
    let b = start("b", &ca, vec![a.local_addr()]).await;
    assert!(wait_for(&a, 2).await && wait_for(&b, 2).await, "a and b see each other: {:?}", a.members());

    let foreign = tls::new_ca().unwrap();
    let intruder = start("c", &foreign, vec![a.local_addr()]).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(intruder.members().len(), 1, "the intruder learned nothing: {:?}", intruder.members());
    assert!(a.members().iter().all(|(m, _)| m.id.as_str() != "c"), "a never admitted c");

    b.leave().await;
    assert!(wait_for(&a, 1).await, "a sees b leave: {:?}", a.members());
}

#[tokio::test]
async fn a_certificate_for_another_node_id_is_refused_at_start() {
    let ca = tls::dev_ca();
    let credentials =
        Credentials { ca_cert: ca.cert.clone(), node: tls::issue(&ca, &NodeId::new("x").unwrap()).unwrap() };
    let bind = "127.0.0.1:0".parse().unwrap();
    let identity =
        Identity { id: NodeId::new("y").unwrap(), mesh_addr: bind, http_addr: bind, weight_milli: 1000, bump: 1 };
    let config = MeshConfig {
        identity,
        bind,
        seeds: vec![],
        profile: Profile::default(),
        credentials,
        clock: now_ms,
        seed: 1,
        handler: None,
    };
    assert!(Mesh::start(config).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_reach_a_member_by_node_id_and_come_back_answered() {
    let ca = tls::dev_ca();
    let echo: gossip::quic::Handler = std::sync::Arc::new(|from: NodeId, body: Vec<u8>| {
        Box::pin(async move { [from.as_str().as_bytes(), b": ", &body[..]].concat() })
    });
    let a = start("a", &ca, vec![]).await;
    let b = start_with("b", &ca, vec![a.local_addr()], Some(echo)).await;
    assert!(wait_for(&a, 2).await && wait_for(&b, 2).await);
    let b_id = NodeId::new("b").unwrap();
    for round in 0..3 {
        let answer = a.request(&b_id, format!("hello {round}").as_bytes()).await.unwrap();
        assert_eq!(answer, format!("a: hello {round}").into_bytes());
    }
    let big = vec![7u8; 200_000]; // Larger than any datagram: streams carry it whole.
    assert_eq!(a.request(&b_id, &big).await.unwrap().len(), 3 + big.len());
    let nobody = a.request(&NodeId::new("nobody").unwrap(), b"?").await;
    assert!(matches!(nobody, Err(gossip::quic::MeshError::NoSuchMember(_))), "{nobody:?}");
}
