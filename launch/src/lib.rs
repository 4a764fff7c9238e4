//! `upcycle-launch`: starting and supervising training workers.
//!
//! It will own the torchrun-style launcher, the rendezvous, restarts, staged plans and
//! cluster job scripts (see `../shared/design/ARCHITECTURE.md`, "Launcher"). Empty until
//! the launcher issue lands.
