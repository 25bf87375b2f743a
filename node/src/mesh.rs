//! Starting this node's mesh endpoint: credentials, identity, profile.

use std::net::SocketAddr;
use std::path::Path;

use anyhow::Context;
use gossip::quic::{Handler, Mesh, MeshConfig};
use gossip::tls::{self, Credentials, Pem};
use gossip::{Identity, NodeId};

use crate::{clock, Config};

/// Reads `ca.pem`, `node.pem` and `node.key` from a certificate directory.
pub fn credentials_from(dir: &Path) -> anyhow::Result<Credentials> {
    let read = |name: &str| {
        std::fs::read_to_string(dir.join(name)).with_context(|| format!("read {}", dir.join(name).display()))
    };
    Ok(Credentials { ca_cert: read("ca.pem")?, node: Pem { cert: read("node.pem")?, key: read("node.key")? } })
}

/// The node's credentials: from `--certs`, or issued on the spot by the development CA.
pub fn credentials(config: &Config, id: &NodeId) -> anyhow::Result<Credentials> {
    match &config.certs {
        Some(dir) => credentials_from(dir),
        None => {
            anyhow::ensure!(config.dev, "no certificates: give --certs or --dev");
            let ca = tls::dev_ca();
            Ok(Credentials {
                ca_cert: ca.cert.clone(),
                node: tls::issue(&ca, id).context("issue a development certificate")?,
            })
        }
    }
}

pub async fn start(config: &Config, http_addr: SocketAddr, handler: Option<Handler>) -> anyhow::Result<Mesh> {
    let id = NodeId::new(config.node_id.clone()).context("node id")?;
    let credentials = credentials(config, &id)?;
    let mut seeds = Vec::new();
    for seed in &config.join {
        let found = tokio::net::lookup_host(seed.as_str()).await.with_context(|| format!("resolve --join {seed}"))?;
        seeds.extend(found);
    }
    // With port 0 the advertised address is only known after binding: bind, then advertise.
    let identity = |mesh_addr| Identity {
        id: id.clone(),
        mesh_addr,
        http_addr,
        weight_milli: config.weight_milli,
        bump: clock::now_ms(),
    };
    let advertise = config.mesh_advertise.unwrap_or(config.mesh);
    let mesh_config = |identity, bind| MeshConfig {
        identity,
        bind,
        seeds: seeds.clone(),
        profile: config.mesh_profile.clone(),
        credentials: credentials.clone(),
        clock: clock::now_ms,
        seed: clock::seed(),
        handler: handler.clone(),
    };
    if advertise.port() != 0 {
        return Mesh::start(mesh_config(identity(advertise), config.mesh)).await.context("start the mesh");
    }
    let socket = std::net::UdpSocket::bind(config.mesh).with_context(|| format!("bind mesh {}", config.mesh))?;
    let bound = socket.local_addr()?;
    drop(socket);
    Mesh::start(mesh_config(identity(bound), bound)).await.context("start the mesh")
}

/// `griddle cluster init`: a new cluster CA in `out`.
pub fn init_ca(out: &Path) -> anyhow::Result<()> {
    let ca = tls::new_ca()?;
    write(out, "ca.pem", &ca.cert, false)?;
    write(out, "ca.key", &ca.key, true)
}

/// `griddle cluster issue`: a certificate for `node` signed by the CA in `ca_dir`.
pub fn issue(ca_dir: &Path, node: &str, out: &Path) -> anyhow::Result<()> {
    let node = NodeId::new(node).context("node ids are 1-64 of A-Z a-z 0-9 _ -")?;
    let read = |name: &str| {
        std::fs::read_to_string(ca_dir.join(name)).with_context(|| format!("read {}", ca_dir.join(name).display()))
    };
    let ca = Pem { cert: read("ca.pem")?, key: read("ca.key")? };
    let issued = tls::issue(&ca, &node)?;
    write(out, "ca.pem", &ca.cert, false)?;
    write(out, "node.pem", &issued.cert, false)?;
    write(out, "node.key", &issued.key, true)
}

fn write(dir: &Path, name: &str, text: &str, secret: bool) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let path = dir.join(name);
    let mode = if secret { 0o600 } else { 0o644 };
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&path)
        .with_context(|| format!("write {}", path.display()))?;
    std::io::Write::write_all(&mut file, text.as_bytes())?;
    Ok(())
}
