//! Mutual TLS material: the cluster CA, certificates that say who holds them, and the
//! identity read back out of a peer's certificate.
//!
//! Every certificate the CA issues carries exactly one identity as a URI subject
//! alternative name: `cluster://node/<id>`, `cluster://operator/<name>` or
//! `cluster://viewer/<name>`. Node certificates also carry the DNS name [`SERVER_NAME`],
//! which clients verify instead of a host name (nodes are reached by address, and the CA
//! is the cluster's own). A credentials directory holds `ca.pem`, `cert.pem`, `key.pem`.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};

use crate::fs::IoError;

/// The DNS name every node certificate carries and every client verifies.
pub const SERVER_NAME: &str = "cluster-node";

/// How long issued certificates are valid by default.
pub const DEFAULT_VALIDITY: Duration = Duration::from_secs(5 * 365 * 24 * 3600);
/// How long the CA is valid.
const CA_VALIDITY: Duration = Duration::from_secs(20 * 365 * 24 * 3600);

pub const CA_CERT: &str = "ca.pem";
pub const CA_KEY: &str = "ca.key";
pub const CERT: &str = "cert.pem";
pub const KEY: &str = "key.pem";

/// How a node or client talks to others: mutual TLS with its credentials, or plaintext
/// (`--insecure`: anyone who can reach a port can do anything).
#[derive(Clone, Debug)]
pub enum Security {
    Tls(std::sync::Arc<Credentials>),
    Insecure,
}

impl Security {
    /// Loads the credentials in `dir`.
    pub fn load(dir: &Path) -> Result<Security, TlsError> {
        Ok(Security::Tls(std::sync::Arc::new(Credentials::load(dir)?)))
    }

    /// For tools and benchmarks: the credentials in `$CLUSTER_TLS`, or plaintext when it
    /// is unset (the CLI itself never falls back: it asks for --tls or --insecure).
    pub fn from_env_or_insecure() -> Result<Security, TlsError> {
        match std::env::var_os("CLUSTER_TLS") {
            Some(dir) => Security::load(Path::new(&dir)),
            None => Ok(Security::Insecure),
        }
    }

    pub fn credentials(&self) -> Option<&Credentials> {
        match self {
            Security::Tls(credentials) => Some(credentials),
            Security::Insecure => None,
        }
    }
}

/// Who holds a certificate, and so what it may do.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Identity {
    /// A member of the cluster: Raft, agent, forwarding, joining under its own id.
    Node(u64),
    /// A person or script that changes the cluster: updates, rollouts, kv writes, membership.
    Operator(String),
    /// A person or dashboard that only reads: status, history, kv reads.
    Viewer(String),
}

/// The three roles of the authorization table (see `rpc::auth`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    Node,
    Operator,
    Viewer,
}

impl Role {
    pub const ALL: [Role; 3] = [Role::Node, Role::Operator, Role::Viewer];
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Node => "node",
            Role::Operator => "operator",
            Role::Viewer => "viewer",
        })
    }
}

impl Identity {
    pub fn role(&self) -> Role {
        match self {
            Identity::Node(_) => Role::Node,
            Identity::Operator(_) => Role::Operator,
            Identity::Viewer(_) => Role::Viewer,
        }
    }

    /// The node id, for node identities.
    pub fn node_id(&self) -> Option<u64> {
        match self {
            Identity::Node(id) => Some(*id),
            _ => None,
        }
    }

    /// The URI SAN that carries this identity.
    pub fn uri(&self) -> String {
        match self {
            Identity::Node(id) => format!("cluster://node/{id}"),
            Identity::Operator(name) => format!("cluster://operator/{name}"),
            Identity::Viewer(name) => format!("cluster://viewer/{name}"),
        }
    }

    /// Parses a URI SAN written by [`Identity::uri`].
    pub fn from_uri(uri: &str) -> Result<Identity, TlsError> {
        let bad = || TlsError::BadIdentity(uri.to_string());
        let rest = uri.strip_prefix("cluster://").ok_or_else(bad)?;
        let (kind, name) = rest.split_once('/').ok_or_else(bad)?;
        match kind {
            "node" => name.parse().map(Identity::Node).map_err(|_| bad()),
            "operator" => Ok(Identity::Operator(valid_name(name).ok_or_else(bad)?)),
            "viewer" => Ok(Identity::Viewer(valid_name(name).ok_or_else(bad)?)),
            _ => Err(bad()),
        }
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Identity::Node(id) => write!(f, "node {id}"),
            Identity::Operator(name) => write!(f, "operator {name:?}"),
            Identity::Viewer(name) => write!(f, "viewer {name:?}"),
        }
    }
}

/// A name for an operator or viewer: 1-64 of `[A-Za-z0-9._@-]`.
fn valid_name(name: &str) -> Option<String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._@-".contains(c));
    ok.then(|| name.to_string())
}

/// Checks an operator or viewer name before a certificate is issued for it.
pub fn check_name(name: &str) -> Result<(), TlsError> {
    valid_name(name)
        .map(|_| ())
        .ok_or_else(|| TlsError::BadName(name.to_string()))
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error(transparent)]
    Io(#[from] IoError),
    #[error("{0} already exists: refusing to overwrite it (remove it first, or choose another directory)")]
    Exists(PathBuf),
    #[error("{path} is missing: {hint}")]
    Missing { path: PathBuf, hint: &'static str },
    #[error("{path} holds no usable certificate: {reason}")]
    BadCertificate { path: PathBuf, reason: String },
    #[error("{path} holds no usable private key: {reason}")]
    BadKey { path: PathBuf, reason: String },
    #[error("certificate identity {0:?} is not cluster://node/<id>, cluster://operator/<name> or cluster://viewer/<name>")]
    BadIdentity(String),
    #[error("the certificate carries no cluster identity (a URI SAN cluster://...): was it issued by `cluster tls issue`?")]
    NoIdentity,
    #[error("the certificate carries {0} identities; exactly one is allowed")]
    ManyIdentities(usize),
    #[error("name {0:?} is not allowed: use 1-64 letters, digits and . _ @ -")]
    BadName(String),
    #[error("{cert} was not issued by the CA in {ca}: issue it again with `cluster tls issue --ca <ca-dir>`")]
    NotIssuedByCa { cert: PathBuf, ca: PathBuf },
    #[error("{path} has expired or is not yet valid (valid {not_before} to {not_after})")]
    NotValidNow {
        path: PathBuf,
        not_before: String,
        not_after: String,
    },
    #[error("could not make the certificate: {0}")]
    Generate(#[from] rcgen::Error),
}

/// What `init_ca` made.
#[derive(Debug, serde::Serialize)]
pub struct CaCreated {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Makes a new cluster CA in `dir` (created if missing): `ca.pem` and `ca.key` (mode 0600).
/// Refuses if either exists, so a CA is never replaced by accident.
pub fn init_ca(dir: &Path) -> Result<CaCreated, TlsError> {
    let cert_path = dir.join(CA_CERT);
    let key_path = dir.join(CA_KEY);
    refuse_existing(&[&cert_path, &key_path])?;
    let mut params = CertificateParams::default();
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, "cluster CA");
    params.distinguished_name = name;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    set_validity(&mut params, CA_VALIDITY);
    let key = KeyPair::generate()?;
    let cert = params.self_signed(&key)?;
    create_dir(dir)?;
    write_new(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
    write_new(&cert_path, cert.pem().as_bytes(), 0o644)?;
    Ok(CaCreated {
        cert: cert_path,
        key: key_path,
    })
}

/// What `issue` made.
#[derive(Debug, serde::Serialize)]
pub struct Issued {
    pub identity: String,
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub not_after: String,
}

/// Issues a certificate for `identity` from the CA in `ca_dir`, into `out` (created if
/// missing): `ca.pem` (a copy of the CA certificate), `cert.pem` and `key.pem` (0600).
/// Refuses if any of them exists.
pub fn issue(
    out: &Path,
    ca_dir: &Path,
    identity: &Identity,
    validity: Duration,
) -> Result<Issued, TlsError> {
    let ca_cert_path = ca_dir.join(CA_CERT);
    let ca_key_path = ca_dir.join(CA_KEY);
    let ca_pem = read(&ca_cert_path, "give the directory `cluster tls init` made")?;
    let ca_key_pem = read(
        &ca_key_path,
        "the CA's private key stays where `cluster tls init` made it",
    )?;
    let ca_key = KeyPair::from_pem(&ca_key_pem).map_err(|e| TlsError::BadKey {
        path: ca_key_path.clone(),
        reason: e.to_string(),
    })?;
    let issuer =
        Issuer::from_ca_cert_pem(&ca_pem, ca_key).map_err(|e| TlsError::BadCertificate {
            path: ca_cert_path.clone(),
            reason: e.to_string(),
        })?;
    if let Identity::Operator(name) | Identity::Viewer(name) = identity {
        check_name(name)?;
    }
    let paths = [out.join(CA_CERT), out.join(CERT), out.join(KEY)];
    refuse_existing(&[&paths[0], &paths[1], &paths[2]])?;

    let mut params = CertificateParams::default();
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, identity.to_string());
    params.distinguished_name = name;
    params.subject_alt_names = vec![SanType::URI(identity.uri().try_into()?)];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    if let Identity::Node(_) = identity {
        params
            .subject_alt_names
            .push(SanType::DnsName(SERVER_NAME.try_into()?));
        params
            .extended_key_usages
            .push(ExtendedKeyUsagePurpose::ServerAuth);
    }
    let not_after = set_validity(&mut params, validity);
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;
    create_dir(out)?;
    write_new(&paths[2], key.serialize_pem().as_bytes(), 0o600)?;
    write_new(&paths[1], cert.pem().as_bytes(), 0o644)?;
    write_new(&paths[0], ca_pem.as_bytes(), 0o644)?;
    let [ca, cert, key] = paths;
    Ok(Issued {
        identity: identity.uri(),
        ca,
        cert,
        key,
        not_after,
    })
}

/// A credentials directory, loaded and checked: the certificate is the CA's, valid now,
/// and names one identity.
#[derive(Clone)]
pub struct Credentials {
    pub dir: PathBuf,
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
    pub identity: Identity,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("dir", &self.dir)
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

impl Credentials {
    /// Loads `ca.pem`, `cert.pem` and `key.pem` from `dir`.
    pub fn load(dir: &Path) -> Result<Credentials, TlsError> {
        let hint = "a credentials directory holds ca.pem, cert.pem and key.pem, as \
                    `cluster tls issue` writes them";
        let ca_path = dir.join(CA_CERT);
        let cert_path = dir.join(CERT);
        let key_path = dir.join(KEY);
        let ca_pem = read(&ca_path, hint)?;
        let cert_pem = read(&cert_path, hint)?;
        let key_pem = read(&key_path, hint)?;
        KeyPair::from_pem(&key_pem).map_err(|e| TlsError::BadKey {
            path: key_path.clone(),
            reason: e.to_string(),
        })?;
        let ca_der = pem_der(&ca_path, &ca_pem)?;
        let cert_der = pem_der(&cert_path, &cert_pem)?;
        let bad = |path: &Path, reason: String| TlsError::BadCertificate {
            path: path.to_path_buf(),
            reason,
        };
        let (_, ca) = x509_parser::parse_x509_certificate(&ca_der)
            .map_err(|e| bad(&ca_path, e.to_string()))?;
        let (_, cert) = x509_parser::parse_x509_certificate(&cert_der)
            .map_err(|e| bad(&cert_path, e.to_string()))?;
        if cert.verify_signature(Some(ca.public_key())).is_err() {
            return Err(TlsError::NotIssuedByCa {
                cert: cert_path,
                ca: ca_path,
            });
        }
        if !cert.validity().is_valid() {
            return Err(TlsError::NotValidNow {
                path: cert_path,
                not_before: cert.validity().not_before.to_string(),
                not_after: cert.validity().not_after.to_string(),
            });
        }
        let identity = identity_of_parsed(&cert)?;
        Ok(Credentials {
            dir: dir.to_path_buf(),
            ca_pem,
            cert_pem,
            key_pem,
            identity,
        })
    }
}

/// The identity a DER certificate carries (its one `cluster://` URI SAN). The caller has
/// verified the certificate's chain (the TLS handshake does).
pub fn identity_of(der: &[u8]) -> Result<Identity, TlsError> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(der).map_err(|e| TlsError::BadCertificate {
            path: PathBuf::from("<peer certificate>"),
            reason: e.to_string(),
        })?;
    identity_of_parsed(&cert)
}

fn identity_of_parsed(
    cert: &x509_parser::certificate::X509Certificate<'_>,
) -> Result<Identity, TlsError> {
    let uris: Vec<&str> = match cert.subject_alternative_name() {
        Ok(Some(san)) => san
            .value
            .general_names
            .iter()
            .filter_map(|name| match name {
                x509_parser::extensions::GeneralName::URI(uri) => Some(*uri),
                _ => None,
            })
            .filter(|uri| uri.starts_with("cluster://"))
            .collect(),
        _ => Vec::new(),
    };
    match uris.as_slice() {
        [] => Err(TlsError::NoIdentity),
        [uri] => Identity::from_uri(uri),
        many => Err(TlsError::ManyIdentities(many.len())),
    }
}

fn pem_der(path: &Path, pem: &str) -> Result<Vec<u8>, TlsError> {
    let (_, parsed) =
        x509_parser::pem::parse_x509_pem(pem.as_bytes()).map_err(|e| TlsError::BadCertificate {
            path: path.to_path_buf(),
            reason: format!("not a PEM certificate: {e}"),
        })?;
    Ok(parsed.contents)
}

fn set_validity(params: &mut CertificateParams, validity: Duration) -> String {
    let now = time::OffsetDateTime::now_utc();
    // An hour of slack for clocks that are a little behind.
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + validity;
    params.not_after.date().to_string()
}

fn refuse_existing(paths: &[&Path]) -> Result<(), TlsError> {
    match paths.iter().find(|p| p.symlink_metadata().is_ok()) {
        Some(path) => Err(TlsError::Exists(path.to_path_buf())),
        None => Ok(()),
    }
}

fn read(path: &Path, hint: &'static str) -> Result<String, TlsError> {
    std::fs::read_to_string(path).map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            TlsError::Missing {
                path: path.to_path_buf(),
                hint,
            }
        } else {
            IoError::new("read", path, source).into()
        }
    })
}

fn create_dir(dir: &Path) -> Result<(), TlsError> {
    std::fs::create_dir_all(dir).map_err(crate::fs::io_error("create the directory", dir))?;
    Ok(())
}

fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<(), TlsError> {
    use std::io::Write;
    let mut file =
        crate::fs::create_new(path, mode).map_err(crate::fs::io_error("create", path))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(crate::fs::io_error("write", path))?;
    if let Some(dir) = path.parent() {
        crate::fs::sync_dir(dir)?;
    }
    Ok(())
}

/// Certificates made once per test process (key generation is the slow part).
#[cfg(test)]
pub mod testing {
    use super::*;

    /// A CA and credentials for `identities` under a temporary directory.
    pub fn credentials(identities: &[Identity]) -> (tempfile::TempDir, Vec<Credentials>) {
        let dir = tempfile::tempdir().unwrap();
        init_ca(&dir.path().join("ca")).unwrap();
        let loaded = identities
            .iter()
            .enumerate()
            .map(|(i, identity)| {
                let out = dir.path().join(format!("c{i}"));
                issue(&out, &dir.path().join("ca"), identity, DEFAULT_VALIDITY).unwrap();
                Credentials::load(&out).unwrap()
            })
            .collect();
        (dir, loaded)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_round_trip_through_their_uri() {
        for identity in [
            Identity::Node(7),
            Identity::Operator("ops@example".into()),
            Identity::Viewer("grafana".into()),
        ] {
            assert_eq!(Identity::from_uri(&identity.uri()).unwrap(), identity);
        }
        for bad in [
            "cluster://node/x",
            "cluster://node/",
            "cluster://admin/a",
            "https://node/1",
            "cluster://operator/",
            "cluster://operator/a b",
        ] {
            assert!(Identity::from_uri(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn issued_certificates_load_with_their_identity() {
        let identities = [Identity::Node(3), Identity::Operator("alice".into())];
        let (_dir, loaded) = testing::credentials(&identities);
        assert_eq!(loaded[0].identity, Identity::Node(3));
        assert_eq!(loaded[1].identity, Identity::Operator("alice".into()));
        let der = pem_der(Path::new("x"), &loaded[0].cert_pem).unwrap();
        assert_eq!(identity_of(&der).unwrap(), Identity::Node(3));
    }

    #[test]
    fn nothing_is_overwritten_and_bad_input_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca");
        init_ca(&ca).unwrap();
        let before = std::fs::read(ca.join(CA_KEY)).unwrap();
        let again = init_ca(&ca).unwrap_err().to_string();
        assert!(again.contains("already exists"), "{again}");
        assert_eq!(std::fs::read(ca.join(CA_KEY)).unwrap(), before);

        let out = dir.path().join("op");
        issue(&out, &ca, &Identity::Operator("a".into()), DEFAULT_VALIDITY).unwrap();
        let twice = issue(&out, &ca, &Identity::Operator("a".into()), DEFAULT_VALIDITY)
            .unwrap_err()
            .to_string();
        assert!(twice.contains("already exists"), "{twice}");

        let bad_name = issue(
            &dir.path().join("x"),
            &ca,
            &Identity::Viewer("a/b".into()),
            DEFAULT_VALIDITY,
        )
        .unwrap_err()
        .to_string();
        assert!(bad_name.contains("not allowed"), "{bad_name}");
        assert!(!dir.path().join("x").exists(), "nothing written");

        let no_ca = issue(
            &dir.path().join("y"),
            &dir.path().join("nope"),
            &Identity::Node(1),
            DEFAULT_VALIDITY,
        )
        .unwrap_err()
        .to_string();
        assert!(no_ca.contains("ca.pem is missing"), "{no_ca}");
    }

    #[test]
    fn a_certificate_from_another_ca_is_refused_at_load() {
        let dir = tempfile::tempdir().unwrap();
        init_ca(&dir.path().join("a")).unwrap();
        init_ca(&dir.path().join("b")).unwrap();
        let out = dir.path().join("n1");
        issue(
            &out,
            &dir.path().join("a"),
            &Identity::Node(1),
            DEFAULT_VALIDITY,
        )
        .unwrap();
        // Swap in the other CA: the certificate no longer chains to it.
        std::fs::remove_file(out.join(CA_CERT)).unwrap();
        std::fs::copy(dir.path().join("b").join(CA_CERT), out.join(CA_CERT)).unwrap();
        let err = Credentials::load(&out).unwrap_err().to_string();
        assert!(err.contains("was not issued by the CA"), "{err}");
    }
}
