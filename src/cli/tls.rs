//! `cluster tls`: the cluster CA and the certificates of nodes, operators and viewers;
//! and the client credentials flags every command that talks to a node takes.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{ArgGroup, Args, Subcommand};

use super::output;
use crate::rpc::Channels;
use crate::tls::{self, Identity, Security};

/// How a client command proves who it is to the node it talks to.
#[derive(Args, Debug, Clone, Default)]
pub struct Auth {
    /// Credentials directory (ca.pem, cert.pem, key.pem from `cluster tls issue`)
    #[arg(long, env = "CLUSTER_TLS", value_name = "DIR")]
    pub tls: Option<PathBuf>,
    /// Talk plaintext, to a node started with --insecure (nobody is authenticated)
    #[arg(long, conflicts_with = "tls")]
    pub insecure: bool,
}

impl Auth {
    /// The security these flags ask for: credentials, or an explicit --insecure.
    pub fn security(&self) -> anyhow::Result<Security> {
        match (&self.tls, self.insecure) {
            (Some(dir), _) => Security::load(dir)
                .with_context(|| format!("client credentials in {}", dir.display())),
            (None, true) => Ok(Security::Insecure),
            (None, false) => anyhow::bail!(
                "no credentials: pass --tls <dir> or set CLUSTER_TLS=<dir> (a directory \
                 `cluster tls issue --operator <name>` made; `cluster local up` prints the \
                 line to use), or --insecure for a cluster started with --insecure"
            ),
        }
    }

    /// A channel pool with these credentials.
    pub fn channels(&self) -> anyhow::Result<Channels> {
        Ok(Channels::new(&self.security()?))
    }
}

#[derive(Subcommand, Debug)]
pub enum TlsCommand {
    /// Make a new cluster CA: <CA_DIR>/ca.pem and ca.key (keep ca.key off the nodes)
    #[command(
        long_about = "Make a new cluster CA: <CA_DIR>/ca.pem (its certificate, \
        which every node and client trusts) and <CA_DIR>/ca.key (its private key, mode 0600: \
        whoever holds it can issue certificates, so keep it on the machine you issue from, \
        not on the nodes). Refuses to overwrite an existing CA.\n\n\
        Then issue a certificate per node and per operator:\n  \
        cluster tls init ./ca\n  \
        cluster tls issue ./n1 --ca ./ca --node 1\n  \
        cluster tls issue ./alice --ca ./ca --operator alice\n  \
        CLUSTER_TLS=./alice cluster status --node 10.0.0.1:7100"
    )]
    Init {
        /// Directory for the CA (created if missing)
        ca_dir: PathBuf,
        /// Print JSON: {cert, key}
        #[arg(long)]
        json: bool,
    },
    /// Issue a certificate: <OUT_DIR>/ca.pem, cert.pem, key.pem
    #[command(
        long_about = "Issue a certificate signed by the cluster CA into <OUT_DIR>: \
        ca.pem (the CA certificate), cert.pem and key.pem (mode 0600). The certificate \
        names exactly one identity, which decides what its holder may do:\n  \
        --node <ID>        a member: Raft, agent, joining under that id (`node run --tls`)\n  \
        --operator <NAME>  updates, rollout operations, kv writes, leadership, membership\n  \
        --viewer <NAME>    status, rollout history, kv reads, gRPC health probes\n\
        Copy the directory to the host or person it is for. Refuses to overwrite files.",
        group(ArgGroup::new("identity").required(true).args(["node", "operator", "viewer"]))
    )]
    Issue {
        /// Directory to write the credentials to (created if missing)
        out_dir: PathBuf,
        /// The CA directory `cluster tls init` made
        #[arg(long, value_name = "CA_DIR")]
        ca: PathBuf,
        /// A node certificate for node <ID>
        #[arg(long, value_name = "ID")]
        node: Option<u64>,
        /// An operator certificate
        #[arg(long, value_name = "NAME")]
        operator: Option<String>,
        /// A read-only viewer certificate
        #[arg(long, value_name = "NAME")]
        viewer: Option<String>,
        /// How many days the certificate is valid
        #[arg(long, default_value_t = 1825)]
        days: u64,
        /// Print JSON: {identity, ca, cert, key, not_after}
        #[arg(long)]
        json: bool,
    },
}

pub fn run(command: TlsCommand) -> anyhow::Result<ExitCode> {
    match command {
        TlsCommand::Init { ca_dir, json } => {
            let made = tls::init_ca(&ca_dir)?;
            if json {
                output::print_json(&made)?;
            } else {
                outln!(
                    "cluster CA made: {} (certificate), {} (private key: keep it off the nodes)",
                    made.cert.display(),
                    made.key.display()
                );
                outln!(
                    "next: cluster tls issue <dir> --ca {} --node <id> | --operator <name>",
                    ca_dir.display()
                );
            }
        }
        TlsCommand::Issue {
            out_dir,
            ca,
            node,
            operator,
            viewer,
            days,
            json,
        } => {
            let identity = match (node, operator, viewer) {
                (Some(id), _, _) => Identity::Node(id),
                (_, Some(name), _) => Identity::Operator(name),
                (_, _, Some(name)) => Identity::Viewer(name),
                _ => unreachable!("clap requires one identity"),
            };
            if days == 0 {
                anyhow::bail!("--days must be at least 1");
            }
            let validity = std::time::Duration::from_secs(days * 24 * 3600);
            let issued = tls::issue(&out_dir, &ca, &identity, validity)?;
            if json {
                output::print_json(&issued)?;
            } else {
                outln!(
                    "issued {} (valid until {}) in {}",
                    identity,
                    issued.not_after,
                    out_dir.display()
                );
                outln!("{}", usage(&identity, &out_dir));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn usage(identity: &Identity, dir: &Path) -> String {
    match identity {
        Identity::Node(id) => format!(
            "use: cluster node run --id {id} --tls {} ... (or tls = \"{}\" in node.toml)",
            dir.display(),
            dir.display()
        ),
        _ => format!("use: export CLUSTER_TLS={}", dir.display()),
    }
}
