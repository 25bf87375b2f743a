//! Mutual TLS for the mesh: a cluster CA, node certificates that name their node, and the
//! rustls configurations (TLS 1.3 only, ring provider) both ends of a QUIC connection use.
//!
//! A node certificate has the common name `<node id>` and the DNS name [`SERVER_NAME`], so
//! any node can verify any other against the CA before it knows which node answers (a seed
//! is known only by address); the membership layer then checks that the node id in the
//! certificate is the one the peer gossips as.
//!
//! `--dev` uses [`dev_ca`], a development CA whose key is public: it is for loopback only.

use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;

use crate::identity::NodeId;
use crate::wire::ALPN;

/// The name every node certificate carries, and every node connects to.
pub const SERVER_NAME: &str = "griddle-node";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("certificate generation: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("client verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    #[error("{0}")]
    Pem(String),
}

/// PEM text of a certificate and its private key.
#[derive(Clone, Debug)]
pub struct Pem {
    pub cert: String,
    pub key: String,
}

/// A new cluster CA.
pub fn new_ca() -> Result<Pem, TlsError> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, "Griddle cluster CA");
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let key = KeyPair::generate()?;
    let cert = params.self_signed(&key)?;
    Ok(Pem { cert: cert.pem(), key: key.serialize_pem() })
}

/// A certificate for `node`, signed by `ca`.
pub fn issue(ca: &Pem, node: &NodeId) -> Result<Pem, TlsError> {
    let ca_key = KeyPair::from_pem(&ca.key)?;
    let ca_cert = CertificateParams::from_ca_cert_pem(&ca.cert)?.self_signed(&ca_key)?;
    let mut params = CertificateParams::new(vec![SERVER_NAME.to_owned()])?;
    params.distinguished_name.push(DnType::CommonName, node.as_str());
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &ca_cert, &ca_key)?;
    Ok(Pem { cert: cert.pem(), key: key.serialize_pem() })
}

/// The development CA `--dev` uses. Its key is in the source: never trust it beyond loopback.
pub fn dev_ca() -> Pem {
    Pem { cert: include_str!("../dev-ca/ca.pem").to_owned(), key: include_str!("../dev-ca/ca.key").to_owned() }
}

/// What a node needs to speak mutual TLS: the CA to trust, its own certificate and key.
#[derive(Clone, Debug)]
pub struct Credentials {
    pub ca_cert: String,
    pub node: Pem,
}

fn certs(pem: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Result<Vec<_>, _> = rustls_pemfile::certs(&mut pem.as_bytes()).collect();
    let certs = certs.map_err(|e| TlsError::Pem(format!("certificate PEM: {e}")))?;
    if certs.is_empty() {
        return Err(TlsError::Pem("no certificate in PEM".into()));
    }
    Ok(certs)
}

fn key(pem: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
    rustls_pemfile::private_key(&mut pem.as_bytes())
        .map_err(|e| TlsError::Pem(format!("key PEM: {e}")))?
        .ok_or_else(|| TlsError::Pem("no private key in PEM".into()))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl Credentials {
    /// The node id this node's own certificate names.
    pub fn node_id(&self) -> Result<NodeId, TlsError> {
        let cert = certs(&self.node.cert)?.remove(0);
        node_id_of(&cert).ok_or_else(|| TlsError::Pem("the node certificate names no valid node id".into()))
    }

    fn roots(&self) -> Result<Arc<rustls::RootCertStore>, TlsError> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in certs(&self.ca_cert)? {
            roots.add(cert)?;
        }
        Ok(Arc::new(roots))
    }

    pub fn server_config(&self) -> Result<rustls::ServerConfig, TlsError> {
        let verifier = WebPkiClientVerifier::builder_with_provider(self.roots()?, provider()).build()?;
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_single_cert(certs(&self.node.cert)?, key(&self.node.key)?)?;
        config.alpn_protocols = vec![ALPN.to_vec()];
        Ok(config)
    }

    pub fn client_config(&self) -> Result<rustls::ClientConfig, TlsError> {
        let mut config = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(self.roots()?)
            .with_client_auth_cert(certs(&self.node.cert)?, key(&self.node.key)?)?;
        config.alpn_protocols = vec![ALPN.to_vec()];
        Ok(config)
    }
}

/// The node id in a certificate's common name.
pub fn node_id_of(cert: &CertificateDer<'_>) -> Option<NodeId> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let cn = parsed.subject().iter_common_name().next()?.as_str().ok()?;
    NodeId::new(cn)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_certificates_name_their_node_and_build_configs() {
        let ca = new_ca().unwrap();
        let node = NodeId::new("node-7").unwrap();
        let credentials = Credentials { ca_cert: ca.cert.clone(), node: issue(&ca, &node).unwrap() };
        assert_eq!(credentials.node_id().unwrap(), node);
        credentials.server_config().unwrap();
        credentials.client_config().unwrap();
        let dev = Credentials { ca_cert: dev_ca().cert, node: issue(&dev_ca(), &node).unwrap() };
        assert_eq!(dev.node_id().unwrap(), node);
    }
}
