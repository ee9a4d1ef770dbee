//! The node's HTTP side listeners (`--metrics-listen`, `--dashboard-listen`): plain HTTP
//! on an `--insecure` node; on a node with TLS, HTTPS that takes only clients holding a
//! certificate of the cluster CA whose role may read the cluster (viewer, operator or
//! node, as for `Control/Status`), so these pages follow the same roles as the gRPC port.

use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::tls::{Credentials, Role};

/// How long a client has to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Connections served at once; beyond, new ones are closed at once, so clients that
/// never finish a handshake cannot pile up tasks.
const MAX_CONNECTIONS: usize = 64;

/// The RPC whose roles a side listener's reader needs: whoever may read the cluster's
/// status may read its metrics and its dashboard.
const READ_RPC: &str = "/cluster.v1.Control/Status";

/// What a side listener serves with: nothing on an insecure node, the node's TLS server
/// configuration (client certificates required) otherwise.
#[derive(Clone)]
pub struct SideTls(Option<Arc<rustls::ServerConfig>>);

/// Why TLS for a side listener could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("cannot serve HTTPS with the node's credentials in {dir}: {reason}")]
pub struct SideTlsError {
    dir: std::path::PathBuf,
    reason: String,
}

impl SideTls {
    /// Plain HTTP (an `--insecure` node).
    pub fn plain() -> SideTls {
        SideTls(None)
    }

    /// HTTPS with the node's certificate, requiring a client certificate of its CA.
    pub fn mutual(credentials: &Credentials) -> Result<SideTls, SideTlsError> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let fail = |reason: String| SideTlsError {
            dir: credentials.dir.clone(),
            reason,
        };
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        for ca in CertificateDer::pem_slice_iter(credentials.ca_pem.as_bytes()) {
            let ca = ca.map_err(|e| fail(format!("ca.pem: {e}")))?;
            roots.add(ca).map_err(|e| fail(format!("ca.pem: {e}")))?;
        }
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            provider.clone(),
        )
        .build()
        .map_err(|e| fail(e.to_string()))?;
        let certs = CertificateDer::pem_slice_iter(credentials.cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| fail(format!("cert.pem: {e}")))?;
        let key = PrivateKeyDer::from_pem_slice(credentials.key_pem.as_bytes())
            .map_err(|e| fail(format!("key.pem: {e}")))?;
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| fail(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(certs, key)
            .map_err(|e| fail(e.to_string()))?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(SideTls(Some(Arc::new(config))))
    }

    /// `https` or `http`, for the address the node logs.
    pub fn scheme(&self) -> &'static str {
        if self.0.is_some() {
            "https"
        } else {
            "http"
        }
    }
}

/// Serves `app` on `listener` until `stop`: as it is without TLS; with TLS, to clients
/// whose certificate the CA issued, and with 403 to those whose role may not read.
pub async fn serve(
    listener: TcpListener,
    tls: SideTls,
    app: axum::Router,
    what: &'static str,
    mut stop: watch::Receiver<bool>,
) {
    let Some(config) = tls.0 else {
        if let Ok(bound) = listener.local_addr() {
            if !bound.ip().is_loopback() {
                tracing::warn!(%bound, "the {what} is served over plain HTTP beyond loopback (an --insecure node): anyone who reaches {bound} reads it");
            }
        }
        let served = axum::serve(listener, app).with_graceful_shutdown(async move {
            let _ = stop.wait_for(|stop| *stop).await;
        });
        if let Err(e) = served.await {
            tracing::error!(error = %e, "the {what} listener failed");
        }
        return;
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stop.wait_for(|stop| *stop) => break,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of descriptors, say: wait a little rather than spin.
                tracing::warn!(error = %e, "the {what} listener could not accept");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        while connections.try_join_next().is_some() {}
        if connections.len() >= MAX_CONNECTIONS {
            tracing::debug!(%peer, "the {what} listener is at {MAX_CONNECTIONS} connections: closing a new one");
            drop(stream);
            continue;
        }
        let acceptor = acceptor.clone();
        let app = app.clone();
        connections.spawn(async move {
            let stream =
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(stream)) => stream,
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "refused a {what} client");
                        return;
                    }
                    Err(_) => return,
                };
            let reader = reader_of(&stream);
            let app = match reader {
                Ok(_) => app,
                Err(refusal) => refused(refusal),
            };
            let service = hyper_util::service::TowerToHyperService::new(app);
            let served = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
            if let Err(e) = served {
                tracing::debug!(%peer, error = %e, "a {what} connection ended");
            }
        });
    }
    connections.shutdown().await;
}

/// The role of the client behind `stream`, if it may read; otherwise why not.
fn reader_of(
    stream: &tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
) -> Result<Role, String> {
    let (_, connection) = stream.get_ref();
    let der = connection
        .peer_certificates()
        .and_then(|certs| certs.first())
        .ok_or("no client certificate")?;
    let identity = crate::tls::identity_of(der).map_err(|e| e.to_string())?;
    let role = identity.role();
    let allowed = crate::rpc::auth::allowed(READ_RPC).unwrap_or(&[]);
    if allowed.contains(&role) {
        Ok(role)
    } else {
        Err(format!(
            "{} may not read the cluster: a viewer or operator certificate is needed \
             (`cluster tls issue <dir> --ca <ca-dir> --viewer <name>`)",
            identity.uri()
        ))
    }
}

/// An app that answers every request with 403 and `refusal`.
fn refused(refusal: String) -> axum::Router {
    axum::Router::new().fallback(move || {
        let refusal = refusal.clone();
        async move { (StatusCode::FORBIDDEN, format!("{refusal}\n")) }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_read_rpc_is_in_the_role_table_with_viewer_and_operator() {
        let allowed = crate::rpc::auth::allowed(READ_RPC).expect("in the table");
        assert!(allowed.contains(&Role::Viewer));
        assert!(allowed.contains(&Role::Operator));
    }
}
