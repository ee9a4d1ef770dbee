//! The ingress sockets a node holds for its services, and how they outlive the node's
//! own restarts: the systemd conventions, so that systemd itself keeps them.
//!
//! A node binds each service's ingress once and gives it to its supervisor's file
//! descriptor store (`sd_notify` with `FDSTORE=1`, `FDNAME=svc-<name>`): systemd keeps
//! it (`FileDescriptorStoreMax=`), and so does `cluster supervise`, which speaks the same
//! protocol. The next start of the node receives it back by socket activation
//! (`LISTEN_FDS`, `LISTEN_FDNAMES`). A node that re-executes itself keeps its descriptors
//! across `exec` and names them in `CLUSTER_INHERITED_FDS`. Either way the listening
//! socket, with its queue of connections not yet accepted, never closes while instances
//! come and go, so no connection is refused.

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex};

/// The name prefix of a service's ingress in a descriptor store.
pub const FD_PREFIX: &str = "svc-";

/// The variable that names descriptors kept across a re-exec (`svc-web=7,svc-api=8`).
pub const INHERITED_ENV: &str = "CLUSTER_INHERITED_FDS";

/// The first descriptor of socket activation (`SD_LISTEN_FDS_START`).
const LISTEN_FDS_START: RawFd = 3;

/// Descriptors this process received at start, by name, until a service claims them.
static RECEIVED: Mutex<Option<BTreeMap<String, OwnedFd>>> = Mutex::new(None);

/// The ingresses this process holds, by name: kept for the life of the process (a
/// reload of the services finds them here), and what a re-exec passes on.
static HELD: Mutex<BTreeMap<String, Arc<TcpListener>>> = Mutex::new(BTreeMap::new());

/// Takes the descriptors passed to this process (socket activation, or a re-exec), once,
/// at start: each is marked close-on-exec so no other child inherits it by accident.
pub fn receive_at_start() {
    let mut received = BTreeMap::new();
    let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let for_us = var("LISTEN_PID").is_none_or(|pid| pid == std::process::id().to_string());
    if let (Some(count), true) = (var("LISTEN_FDS"), for_us) {
        let count: i32 = count.parse().unwrap_or(0).clamp(0, 1024);
        let names = var("LISTEN_FDNAMES").unwrap_or_default();
        let names: Vec<&str> = names.split(':').collect();
        for i in 0..count {
            let fd = LISTEN_FDS_START + i;
            let name = names.get(i as usize).copied().unwrap_or("unknown");
            if let Some(owned) = claim(fd) {
                received.insert(name.to_string(), owned);
            }
        }
    }
    if let Some(list) = var(INHERITED_ENV) {
        for pair in list.split(',') {
            let Some((name, fd)) = pair.split_once('=') else {
                continue;
            };
            if let Some(owned) = fd.parse().ok().and_then(claim) {
                received.insert(name.to_string(), owned);
            }
        }
    }
    *RECEIVED.lock().unwrap_or_else(|e| e.into_inner()) = Some(received);
}

/// `fd` as an owned descriptor if it is open, marked close-on-exec. Standard input,
/// output and error are never taken, whatever a variable names.
fn claim(fd: RawFd) -> Option<OwnedFd> {
    if fd < LISTEN_FDS_START {
        return None;
    }
    // SAFETY: fcntl on a descriptor number; F_GETFD fails harmlessly if it is not open.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    if flags < 0 {
        return None;
    }
    // SAFETY: as above; the descriptor was passed to this process for it to own.
    unsafe {
        libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC);
        Some(OwnedFd::from_raw_fd(fd))
    }
}

/// The ingress of service `name` on `addr`: the one this process already holds, or the
/// listener this node's previous process held (same address; for port 0 the same IP),
/// or a new one given to the supervisor's store.
pub fn ingress(name: &str, addr: SocketAddr) -> std::io::Result<Arc<TcpListener>> {
    let key = format!("{FD_PREFIX}{name}");
    let matches = |listener: &TcpListener| {
        listener
            .local_addr()
            .is_ok_and(|bound| bound == addr || (addr.port() == 0 && bound.ip() == addr.ip()))
    };
    let mut held = HELD.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(listener) = held.get(&key).filter(|l| matches(l)) {
        return Ok(listener.clone());
    }
    let previous = RECEIVED
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .as_mut()
        .and_then(|received| received.remove(&key));
    if let Some(fd) = previous {
        let listener = TcpListener::from(fd);
        if matches(&listener) && is_listening(&listener) {
            let listener = Arc::new(listener);
            held.insert(key, listener.clone());
            return Ok(listener);
        }
        tracing::info!(service = name, %addr, "the ingress kept from before listens elsewhere: binding anew");
    }
    let listener = Arc::new(bind(addr)?);
    if let Err(e) = store(&key, listener.as_raw_fd()) {
        tracing::warn!(service = name, error = %e, "the supervisor does not keep the ingress: a restart of the node will close it for a moment");
    }
    held.insert(key, listener.clone());
    Ok(listener)
}

/// A listener on `addr` with a backlog deep enough for a burst during a cutover.
fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let listener = TcpListener::bind(addr)?;
    // SAFETY: listen(2) again on our own listening socket only raises its backlog.
    unsafe {
        libc::listen(listener.as_raw_fd(), 1024);
    }
    Ok(listener)
}

fn is_listening(listener: &TcpListener) -> bool {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt into a c_int of the size given.
    let ok = unsafe {
        libc::getsockopt(
            listener.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ACCEPTCONN,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    ok == 0 && value == 1
}

/// For a re-exec: the held ingresses made inheritable, as `CLUSTER_INHERITED_FDS`.
pub fn pass_on_exec() -> Option<String> {
    let held = HELD.lock().unwrap_or_else(|e| e.into_inner());
    if held.is_empty() {
        return None;
    }
    let mut pairs = Vec::new();
    for (name, listener) in held.iter() {
        let fd = &listener.as_raw_fd();
        // SAFETY: clears FD_CLOEXEC on a descriptor this process holds open.
        unsafe {
            let flags = libc::fcntl(*fd, libc::F_GETFD);
            if flags >= 0 {
                libc::fcntl(*fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC);
            }
        }
        pairs.push(format!("{name}={fd}"));
    }
    Some(pairs.join(","))
}

/// Gives `fd` to the supervisor's descriptor store under `name` (`sd_notify`
/// `FDSTORE=1`). Without `NOTIFY_SOCKET` there is no store: an error says so.
pub fn store(name: &str, fd: RawFd) -> Result<(), String> {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return Err(
            "no NOTIFY_SOCKET: the node runs without a supervisor that keeps descriptors".into(),
        );
    };
    let message = format!("FDSTORE=1\nFDNAME={name}\n");
    send_with_fds(path.as_encoded_bytes(), message.as_bytes(), &[fd])
        .map_err(|e| format!("sd_notify to {}: {e}", path.to_string_lossy()))
}

/// `sockaddr_un` for a notify socket path (`@name` is in the abstract namespace).
fn unix_addr(path: &[u8]) -> std::io::Result<(libc::sockaddr_un, libc::socklen_t)> {
    // SAFETY: an all-zero sockaddr_un is valid.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    if path.is_empty() || path.len() >= addr.sun_path.len() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "bad socket path",
        ));
    }
    for (i, b) in path.iter().enumerate() {
        addr.sun_path[i] = *b as libc::c_char;
    }
    if path[0] == b'@' {
        addr.sun_path[0] = 0;
    }
    let len = std::mem::size_of::<libc::sa_family_t>() + path.len();
    Ok((addr, len as libc::socklen_t))
}

/// One datagram with descriptors (SCM_RIGHTS) to the unix socket at `path`.
fn send_with_fds(path: &[u8], message: &[u8], fds: &[RawFd]) -> std::io::Result<()> {
    let (addr, addr_len) = unix_addr(path)?;
    // SAFETY: a new socket we own.
    let raw = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: raw is a socket we just created.
    let socket = unsafe { OwnedFd::from_raw_fd(raw) };
    let mut iov = libc::iovec {
        iov_base: message.as_ptr() as *mut libc::c_void,
        iov_len: message.len(),
    };
    let fd_bytes = std::mem::size_of_val(fds);
    // SAFETY: CMSG_SPACE is a pure size computation.
    let space = unsafe { libc::CMSG_SPACE(fd_bytes as u32) } as usize;
    let mut control = vec![0u8; space];
    // SAFETY: msghdr is plain data; every pointer in it outlives the sendmsg call.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_name = (&addr as *const libc::sockaddr_un as *mut libc::sockaddr_un).cast();
        msg.msg_namelen = addr_len;
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        if !fds.is_empty() {
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = space as _;
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(fd_bytes as u32) as _;
            std::ptr::copy_nonoverlapping(
                fds.as_ptr().cast::<u8>(),
                libc::CMSG_DATA(cmsg),
                fd_bytes,
            );
        }
        if libc::sendmsg(socket.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The receiving end of `NOTIFY_SOCKET`, for `cluster supervise`: a datagram socket in
/// the abstract namespace whose `FDSTORE=1` messages fill a descriptor store.
pub struct NotifySocket {
    socket: OwnedFd,
    /// The `NOTIFY_SOCKET` value a child is given (`@cluster-supervise-<pid>-<n>`).
    pub address: String,
}

impl NotifySocket {
    /// A new socket under a name unique to this process. The abstract namespace has no
    /// permissions: every message carries its sender's credentials (`SO_PASSCRED`), so
    /// the supervisor keeps descriptors only from its own node.
    pub fn bind() -> std::io::Result<NotifySocket> {
        let address = format!(
            "@cluster-supervise-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        );
        let (addr, len) = unix_addr(address.as_bytes())?;
        // SAFETY: a new socket we own; bind with a valid address of `len` bytes.
        unsafe {
            let raw = libc::socket(libc::AF_UNIX, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
            if raw < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let socket = OwnedFd::from_raw_fd(raw);
            if libc::bind(raw, (&addr as *const libc::sockaddr_un).cast(), len) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let on: libc::c_int = 1;
            let set = libc::setsockopt(
                raw,
                libc::SOL_SOCKET,
                libc::SO_PASSCRED,
                (&on as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
            if set < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(NotifySocket { socket, address })
        }
    }

    /// Blocks for the next message; returns its text, the descriptors it carried and
    /// the sender's pid (as the kernel vouches for it).
    pub fn receive(&self) -> std::io::Result<(String, Vec<OwnedFd>, Option<u32>)> {
        let mut buffer = vec![0u8; 4096];
        let mut control = vec![0u8; 4096];
        let mut iov = libc::iovec {
            iov_base: buffer.as_mut_ptr().cast(),
            iov_len: buffer.len(),
        };
        // SAFETY: msghdr points at buffers that outlive the call; the kernel fills them.
        unsafe {
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = control.len() as _;
            let read = libc::recvmsg(self.socket.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC);
            if read < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let mut fds = Vec::new();
            let mut sender = None;
            let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
            while !cmsg.is_null() {
                if (*cmsg).cmsg_level == libc::SOL_SOCKET
                    && (*cmsg).cmsg_type == libc::SCM_CREDENTIALS
                {
                    let creds: libc::ucred =
                        std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<libc::ucred>());
                    sender = u32::try_from(creds.pid).ok();
                }
                if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                    let data = libc::CMSG_DATA(cmsg);
                    let bytes = (*cmsg).cmsg_len as usize - (data as usize - cmsg as usize);
                    for i in 0..bytes / std::mem::size_of::<RawFd>() {
                        let fd = std::ptr::read_unaligned(data.cast::<RawFd>().add(i));
                        fds.push(OwnedFd::from_raw_fd(fd));
                    }
                }
                cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
            }
            let text = String::from_utf8_lossy(&buffer[..read as usize]).into_owned();
            Ok((text, fds, sender))
        }
    }
}

/// What a supervisor keeps for its node: descriptors by name, given back on every start.
#[derive(Default)]
pub struct FdStore(Mutex<BTreeMap<String, OwnedFd>>);

impl FdStore {
    /// Applies one notify message: `FDSTORE=1` with `FDNAME=` keeps its descriptor
    /// (replacing one of the same name); anything else is ignored.
    pub fn apply(&self, text: &str, fds: Vec<OwnedFd>) {
        let field = |key: &str| {
            text.lines()
                .find_map(|line| line.strip_prefix(key).and_then(|l| l.strip_prefix('=')))
        };
        if field("FDSTORE") != Some("1") {
            return;
        }
        let name = field("FDNAME").unwrap_or("stored").to_string();
        if let Some(fd) = fds.into_iter().next() {
            self.0
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(name, fd);
        }
    }

    /// Duplicates of the stored descriptors (close-on-exec, numbered above 100 so that
    /// moving them to 3, 4, ... in a child overwrites none of them), with their names.
    pub fn duplicates(&self) -> Vec<(String, OwnedFd)> {
        let store = self.0.lock().unwrap_or_else(|e| e.into_inner());
        store
            .iter()
            .filter_map(|(name, fd)| {
                // SAFETY: F_DUPFD_CLOEXEC on a descriptor we hold; a new one we own.
                let dup = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 100) };
                (dup >= 0).then(|| (name.clone(), unsafe { OwnedFd::from_raw_fd(dup) }))
            })
            .collect()
    }
}

/// In a child between fork and exec: moves `fds` to 3, 4, ... (clearing close-on-exec).
/// Only async-signal-safe calls.
pub fn move_to_listen_fds(fds: &[RawFd]) -> std::io::Result<()> {
    for (i, fd) in fds.iter().enumerate() {
        // SAFETY: dup2 is async-signal-safe; the sources are numbered above every target.
        if unsafe { libc::dup2(*fd, LISTEN_FDS_START + i as RawFd) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_descriptor_sent_to_the_notify_socket_lands_in_the_store() {
        let socket = NotifySocket::bind().unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        send_with_fds(
            socket.address.as_bytes(),
            b"FDSTORE=1\nFDNAME=svc-web\n",
            &[listener.as_raw_fd()],
        )
        .unwrap();
        drop(listener);
        let (text, fds, sender) = socket.receive().unwrap();
        assert_eq!(
            sender,
            Some(std::process::id()),
            "the kernel names the sender"
        );
        let store = FdStore::default();
        store.apply(&text, fds);
        // A message without FDSTORE=1 keeps nothing.
        store.apply("READY=1\n", Vec::new());
        let kept = store.duplicates();
        assert_eq!(kept.len(), 1);
        assert_eq!(kept[0].0, "svc-web");
        // The same listening socket, still open though our own copy was closed.
        let again = TcpListener::from(kept[0].1.try_clone().unwrap());
        assert_eq!(again.local_addr().unwrap(), addr);
        assert!(is_listening(&again));
        std::net::TcpStream::connect(addr).expect("connections still queue");
    }
}
