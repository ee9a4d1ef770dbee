//! `cluster`: a Raft-replicated rolling-update orchestrator.
