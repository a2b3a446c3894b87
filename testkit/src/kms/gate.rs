//! A TCP gate in front of a test server, for outage tests: [`Gate::close`] takes the server
//! away (the gate's port refuses connections and open ones are cut), [`Gate::open`] brings it
//! back on the same port with the server's state intact — what a KMS outage in the middle of
//! a run looks like to a client, for any protocol (HTTP, TLS, KMIP).

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::service::{free_port, Error, Result};

/// A TCP forwarder from a port of its own on 127.0.0.1 to `backend`.
pub struct Gate {
    port: u16,
    backend: SocketAddr,
    state: Mutex<GateState>,
}

#[derive(Default)]
struct GateState {
    running: Option<(Arc<AtomicBool>, JoinHandle<()>)>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
}

impl std::fmt::Debug for Gate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gate")
            .field("port", &self.port)
            .field("backend", &self.backend)
            .finish_non_exhaustive()
    }
}

impl Gate {
    /// An open gate to `backend`.
    ///
    /// # Errors
    /// [`Error::Io`] when no port can be bound.
    pub fn new(backend: SocketAddr) -> Result<Gate> {
        let gate = Gate {
            port: free_port()?,
            backend,
            state: Mutex::new(GateState::default()),
        };
        gate.open()?;
        Ok(gate)
    }

    /// The gate's port on 127.0.0.1: point clients here.
    #[must_use]
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:<port>`.
    #[must_use]
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }

    /// Lets connections through again (on the same port).
    ///
    /// # Errors
    /// [`Error::Io`] when the port cannot be bound again.
    pub fn open(&self) -> Result<()> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.running.is_some() {
            return Ok(());
        }
        // The port was ours a moment ago; give the kernel a little time if it still holds it.
        let deadline = Instant::now() + Duration::from_secs(5);
        let listener = loop {
            match TcpListener::bind((Ipv4Addr::LOCALHOST, self.port)) {
                Ok(l) => break l,
                Err(e) if Instant::now() < deadline && e.kind() == io::ErrorKind::AddrInUse => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => return Err(Error::Io(e)),
            }
        };
        listener.set_nonblocking(true)?;
        let running = Arc::new(AtomicBool::new(true));
        let flag = Arc::clone(&running);
        let conns = Arc::clone(&state.conns);
        let backend = self.backend;
        let accept = std::thread::spawn(move || {
            while flag.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((client, _)) => {
                        let _ = client.set_nonblocking(false);
                        if let Ok(server) = TcpStream::connect(backend) {
                            forward(client, server, &conns);
                        }
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
            // Dropping the listener here closes the port.
        });
        state.running = Some((running, accept));
        Ok(())
    }

    /// Takes the server away: new connections are refused, open ones are cut.
    pub fn close(&self) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((flag, accept)) = state.running.take() {
            flag.store(false, Ordering::SeqCst);
            let _ = accept.join();
        }
        let mut conns = state.conns.lock().unwrap_or_else(|e| e.into_inner());
        for c in conns.drain(..) {
            let _ = c.shutdown(Shutdown::Both);
        }
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        self.close();
    }
}

/// Copies both ways on two threads; records the sockets so that [`Gate::close`] can cut them.
fn forward(client: TcpStream, server: TcpStream, conns: &Arc<Mutex<Vec<TcpStream>>>) {
    let (Ok(c2), Ok(s2)) = (client.try_clone(), server.try_clone()) else {
        return;
    };
    if let (Ok(c3), Ok(s3)) = (client.try_clone(), server.try_clone()) {
        let mut list = conns.lock().unwrap_or_else(|e| e.into_inner());
        // Forget sockets of finished connections now and then.
        list.retain(|s| s.peer_addr().is_ok());
        list.push(c3);
        list.push(s3);
    }
    std::thread::spawn(move || pipe(client, s2));
    std::thread::spawn(move || pipe(server, c2));
}

fn pipe(mut from: TcpStream, mut to: TcpStream) {
    let mut buf = [0u8; 16 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gate_forwards_refuses_when_closed_and_reopens_on_its_port() {
        let backend = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let addr = backend.local_addr().unwrap();
        std::thread::spawn(move || {
            for s in backend.incoming() {
                let mut s = s.unwrap();
                std::thread::spawn(move || {
                    let mut b = [0u8; 5];
                    if s.read_exact(&mut b).is_ok() {
                        let _ = s.write_all(&b);
                    }
                });
            }
        });
        let gate = Gate::new(addr).unwrap();
        let echo = || -> io::Result<[u8; 5]> {
            let mut s = TcpStream::connect_timeout(&gate.addr(), Duration::from_secs(2))?;
            s.set_read_timeout(Some(Duration::from_secs(2)))?;
            s.write_all(b"hello")?;
            let mut b = [0u8; 5];
            s.read_exact(&mut b)?;
            Ok(b)
        };
        assert_eq!(&echo().unwrap(), b"hello");
        gate.close();
        assert!(echo().is_err());
        gate.open().unwrap();
        assert_eq!(&echo().unwrap(), b"hello");
    }
}
