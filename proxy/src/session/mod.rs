//! One client session: establish it, then relay commands to its backend one at a time,
//! tracking the server state that decides when the session can safely move to another backend,
//! and moving it there when the balancer asks.

pub mod auth;
pub mod error;
pub mod forward;
pub mod migrate;
pub mod query;
pub mod state;
pub mod token_cache;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};

use crate::backend::{Backend, BalanceConfig, Control, Registry, SessionLease};
use crate::config::Config;
use crate::metrics;
use crate::net::stream::Stream;
use crate::protocol::capability as cap;
use crate::protocol::command;
use crate::protocol::conn::PacketConn;
use crate::protocol::error_code;
use crate::protocol::response::ErrPacket;
use auth::{ClientAddr, Established, Identity};
pub use error::SessionError;
use forward::{
    forward, OnePacket, PrepareFraming, ResultFraming, SinglePacket, Step, UntilEmptyPacket,
};
use migrate::{MigrateError, MigrationInput};
use state::SessionState;

/// Migrations in flight at once: enough to empty a TiDB of thousands of sessions within
/// seconds, few enough not to swamp the target with logins.
const MAX_CONCURRENT_MIGRATIONS: usize = 32;

/// What every session shares: configuration, TLS material, the backends.
pub struct SessionContext {
    pub config: Arc<Config>,
    pub server_tls: Option<Arc<rustls::ServerConfig>>,
    pub sql_tls: Option<Arc<rustls::ClientConfig>>,
    pub registry: Arc<Registry>,
    pub balance: BalanceConfig,
    /// Becomes true when the proxy starts closing sessions (after the graceful wait).
    pub closing: watch::Receiver<bool>,
    /// Bounds the migrations in flight at once.
    pub migration_permits: Arc<Semaphore>,
    /// Session tokens of recent migrations, for logging in to a target early.
    pub session_tokens: token_cache::TokenCache,
    server_version: RwLock<Arc<str>>,
    /// MariaDB extensions the last backend greeting offered (0 for TiDB and MySQL).
    mariadb_caps: AtomicU32,
    next_connection_id: AtomicU32,
}

impl SessionContext {
    pub fn new(
        config: Arc<Config>,
        server_tls: Option<Arc<rustls::ServerConfig>>,
        sql_tls: Option<Arc<rustls::ClientConfig>>,
        registry: Arc<Registry>,
        balance: BalanceConfig,
        closing: watch::Receiver<bool>,
    ) -> Self {
        let version: Arc<str> = config.proxy.server_version.as_str().into();
        Self {
            config,
            server_tls,
            sql_tls,
            registry,
            balance,
            closing,
            migration_permits: Arc::new(Semaphore::new(MAX_CONCURRENT_MIGRATIONS)),
            session_tokens: token_cache::TokenCache::default(),
            server_version: RwLock::new(version),
            mariadb_caps: AtomicU32::new(0),
            next_connection_id: AtomicU32::new(1),
        }
    }

    /// The version announced to new clients: the last one a backend announced, so clients see
    /// the real server's version once any session has connected.
    pub fn server_version(&self) -> Arc<str> {
        self.server_version
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn remember_server_version(&self, version: &str) {
        if *self.server_version() != *version {
            *self
                .server_version
                .write()
                .unwrap_or_else(|e| e.into_inner()) = version.into();
        }
    }

    /// The MariaDB extensions to announce to new clients: those the backends offer and the
    /// proxy can pass through.
    pub fn mariadb_caps(&self) -> u32 {
        self.mariadb_caps.load(Ordering::Relaxed) & crate::protocol::handshake::MARIADB_PASSTHROUGH
    }

    pub fn remember_mariadb_caps(&self, caps: u32) {
        self.mariadb_caps.store(caps, Ordering::Relaxed);
    }

    pub fn buffer_size(&self) -> usize {
        self.config.proxy.buffer_size()
    }

    pub fn connect_timeout(&self) -> Duration {
        Duration::from_secs(self.config.proxy.connect_timeout)
    }

    fn handshake_timeout(&self) -> Duration {
        Duration::from_secs(self.config.proxy.handshake_timeout)
    }

    fn next_connection_id(&self) -> u32 {
        self.next_connection_id.fetch_add(1, Ordering::Relaxed)
    }
}

/// A migration the balancer asked for and the session has not carried out yet.
struct PendingMigration {
    target: Arc<Backend>,
    reason: &'static str,
    requested: Instant,
}

/// An established session relaying commands.
pub struct Session<'a> {
    ctx: &'a SessionContext,
    connection_id: u32,
    client: PacketConn,
    backend: PacketConn,
    lease: SessionLease,
    control: mpsc::Receiver<Control>,
    pending: Option<PendingMigration>,
    addr: ClientAddr,
    client_caps: u32,
    backend_caps: u32,
    identity: Identity,
    state: SessionState,
    closing: watch::Receiver<bool>,
    query_metrics: QueryMetrics,
}

/// Per-session cache of the labelled query metrics, so the hot path does not hash label
/// values on every command. Emptied when the session changes backend.
#[derive(Default)]
struct QueryMetrics {
    by_command: Vec<Option<(prometheus::IntCounter, prometheus::Histogram)>>,
}

impl QueryMetrics {
    fn get(&mut self, backend: &str, cmd: u8) -> &(prometheus::IntCounter, prometheus::Histogram) {
        let i = usize::from(cmd).min(0x20);
        if self.by_command.len() <= i {
            self.by_command.resize(i + 1, None);
        }
        self.by_command[i].get_or_insert_with(|| {
            let m = metrics::get();
            let labels = [backend, command::name(cmd)];
            (
                m.queries.with_label_values(&labels),
                m.query_duration.with_label_values(&labels),
            )
        })
    }

    fn clear(&mut self) {
        self.by_command.clear();
    }
}

/// Serves one accepted client connection until it ends.
pub async fn serve(ctx: Arc<SessionContext>, tcp: TcpStream, addr: ClientAddr) {
    let connection_id = ctx.next_connection_id();
    let peer = addr.peer;
    // Fields are logged per event rather than through a span: entering a span on every poll
    // costs more than the forwarding itself.
    match run(&ctx, tcp, addr, connection_id).await {
        Ok(()) => tracing::debug!(conn = connection_id, client = %peer, "session closed"),
        Err(e) if e.is_routine() => {
            tracing::debug!(conn = connection_id, client = %peer, reason = %e, "session closed")
        }
        Err(e) => {
            tracing::warn!(conn = connection_id, client = %peer, reason = %e, "session closed")
        }
    }
}

async fn run(
    ctx: &SessionContext,
    tcp: TcpStream,
    mut addr: ClientAddr,
    connection_id: u32,
) -> Result<(), SessionError> {
    let mut client = Some(PacketConn::new(Stream::Tcp(tcp), ctx.buffer_size()));
    let mut client_seq = 0u8;
    let established = tokio::time::timeout(
        ctx.handshake_timeout(),
        Box::pin(auth::establish(
            ctx,
            &mut client,
            &mut addr,
            connection_id,
            &mut client_seq,
        )),
    )
    .await
    .unwrap_or(Err(SessionError::HandshakeTimeout));
    let established = match established {
        Ok(e) => e,
        Err(e) => {
            if let (Some(conn), Some(err)) = (client.as_mut(), e.client_error()) {
                let _ = conn.write_packet(client_seq, &err.encode()).await;
                conn.shutdown().await;
            }
            return Err(e);
        }
    };
    let mut session = Session::new(ctx, connection_id, established, addr);
    tracing::debug!(
        conn = connection_id,
        backend = %session.lease.backend().addr,
        user = %session.identity.user,
        "session established"
    );
    let result = Box::pin(session.relay()).await;
    session.backend.shutdown().await;
    session.client.shutdown().await;
    result
}

impl<'a> Session<'a> {
    fn new(ctx: &'a SessionContext, connection_id: u32, e: Established, addr: ClientAddr) -> Self {
        Self {
            ctx,
            connection_id,
            client: e.client,
            backend: e.backend,
            lease: e.lease,
            control: e.control,
            pending: None,
            addr,
            client_caps: e.client_caps,
            backend_caps: e.backend_caps,
            identity: e.identity,
            state: SessionState::default(),
            closing: ctx.closing.clone(),
            query_metrics: QueryMetrics::default(),
        }
    }

    fn deprecate_eof(&self) -> bool {
        self.client_caps & cap::DEPRECATE_EOF != 0
    }

    /// Relays commands until the client quits or a leg fails.
    async fn relay(&mut self) -> Result<(), SessionError> {
        loop {
            self.client.release_idle_buffers();
            self.backend.release_idle_buffers();
            self.wait_for_command().await?;
            self.client.fill_to(5).await.map_err(SessionError::Client)?;
            let request = self.client.buffered();
            let len = crate::protocol::codec::payload_len(request);
            if len == 0 {
                return Err(SessionError::ClientMalformed(
                    crate::protocol::codec::Malformed("empty command packet"),
                ));
            }
            let cmd = request[4];
            // The client numbered its command from zero; replies continue from there. The
            // proxy starts a new command towards the backend.
            self.client.observe_read_seq(request[3]);
            self.backend.reset_sequence();
            if cmd == command::QUIT {
                return Ok(());
            }
            let started = Instant::now();
            if !(cmd == command::QUERY && self.hold_begin(len).await?) {
                self.execute(cmd, len).await?;
            }
            self.record_query(cmd, started);
            self.migrate_if_due().await?;
        }
    }

    fn record_query(&mut self, cmd: u8, started: Instant) {
        let backend = self.lease.backend();
        let (count, duration) = self.query_metrics.get(backend.addr.as_str(), cmd);
        count.inc();
        duration.observe(started.elapsed().as_secs_f64());
    }

    /// Waits for the client's next command. Meanwhile the backend must stay silent: if it
    /// closes, the session is over. Migration requests are taken (and carried out, since an
    /// idle session is at a safe point unless a transaction or cursor is open). When the proxy
    /// is shutting down, a session at a safe point ends here instead of waiting.
    async fn wait_for_command(&mut self) -> Result<(), SessionError> {
        let ctx = self.ctx;
        loop {
            let safe = self.state.is_safe_point();
            if safe && *self.closing.borrow() {
                return Err(SessionError::Shutdown);
            }
            tokio::select! {
                r = self.client.wait_readable() => return r.map_err(SessionError::Client),
                r = self.backend.wait_readable() => {
                    return Err(match r {
                        Ok(()) => SessionError::BackendMalformed(
                            crate::protocol::codec::Malformed("unsolicited data from backend"),
                        ),
                        Err(e) => SessionError::Backend(e),
                    })
                }
                Some(control) = self.control.recv() => self.take_control(control),
                permit = ctx.migration_permits.clone().acquire_owned(), if safe && self.pending.is_some() => {
                    if let Ok(permit) = permit {
                        self.migrate_now(permit).await?;
                    }
                }
                _ = async { let _ = self.closing.wait_for(|c| *c).await; }, if safe => {
                    return Err(SessionError::Shutdown)
                }
            }
        }
    }

    fn take_control(&mut self, control: Control) {
        match control {
            Control::Migrate { target, reason } => {
                self.pending = Some(PendingMigration {
                    target,
                    reason,
                    requested: Instant::now(),
                });
            }
        }
    }

    /// Carries out a pending migration if the session is at a safe point and a migration slot
    /// is free right now (otherwise the wait for the next command also waits for a slot).
    async fn migrate_if_due(&mut self) -> Result<(), SessionError> {
        if self.pending.is_none() || !self.state.is_safe_point() {
            return Ok(());
        }
        match self.ctx.migration_permits.clone().try_acquire_owned() {
            Ok(permit) => self.migrate_now(permit).await,
            Err(_) => Ok(()),
        }
    }

    /// Moves the session to the pending target. The permit bounds how many migrations run at
    /// once, so a draining TiDB's sessions do not all log in to the targets in one burst.
    async fn migrate_now(&mut self, _permit: OwnedSemaphorePermit) -> Result<(), SessionError> {
        let Some(pending) = self.pending.take() else {
            return Ok(());
        };
        let from = self.lease.backend().addr.clone();
        let to = pending.target.addr.clone();
        let m = metrics::get();
        // The target may have gone bad since the request.
        let info = pending.target.info();
        if !info.routable() || Arc::ptr_eq(&pending.target, self.lease.backend()) {
            self.lease.migration_abandoned();
            return Ok(());
        }
        let input = MigrationInput {
            identity: &self.identity,
            source: &from,
            client_addr: &self.addr,
            backend_caps: self.backend_caps,
            tls: self.backend.is_tls(),
            resequence: self.backend.resequencing(),
        };
        let result = migrate::migrate(self.ctx, &mut self.backend, &input, &pending.target).await;
        let elapsed = pending.requested.elapsed().as_secs_f64();
        let outcome = if result.is_ok() { "succeed" } else { "fail" };
        m.migrations
            .with_label_values(&[from.as_str(), to.as_str(), pending.reason, outcome])
            .inc();
        m.migration_duration
            .with_label_values(&[from.as_str(), to.as_str(), outcome])
            .observe(elapsed);
        match result {
            Ok((conn, database)) => {
                let old = std::mem::replace(&mut self.backend, conn);
                let mut old = old;
                old.shutdown().await;
                self.identity.database = database;
                self.lease.move_to(pending.target);
                self.query_metrics.clear();
                tracing::debug!(conn = self.connection_id, %from, %to, reason = pending.reason, "session migrated");
                Ok(())
            }
            Err(MigrateError::OldBackendLost(reason)) => {
                self.lease.migration_failed(None);
                Err(SessionError::BackendLost(reason))
            }
            Err(e) => {
                let blocked = matches!(e, MigrateError::Refused(_) | MigrateError::NoToken);
                if blocked {
                    m.migrate_blocked
                        .with_label_values(&[e.cause().as_str()])
                        .inc();
                }
                tracing::info!(conn = self.connection_id, %from, %to, reason = %e, "session stays: migration failed");
                self.lease.migration_failed(blocked.then(|| e.to_string()));
                Ok(())
            }
        }
    }

    /// The reference's "hold BEGIN": a session asked to move but inside a transaction that the
    /// application never commits explicitly would never reach a safe point. When such a session
    /// sends `BEGIN`/`START TRANSACTION` (which implicitly commits), the proxy commits on the old
    /// backend itself, moves the session, then sends the `BEGIN` to the new backend. Returns
    /// whether the command was fully handled here.
    async fn hold_begin(&mut self, len: usize) -> Result<bool, SessionError> {
        if self.pending.is_none()
            || !self.state.in_transaction()
            || self.state.has_pending_statements()
        {
            return Ok(false);
        }
        let peek = len.min(256);
        self.client
            .fill_to(4 + peek)
            .await
            .map_err(SessionError::Client)?;
        if !query::starts_transaction(&self.client.buffered()[5..4 + peek]) {
            return Ok(false);
        }
        let deprecate_eof = self.backend_caps & cap::DEPRECATE_EOF != 0;
        match query::run_query(&mut self.backend, "COMMIT", deprecate_eof).await {
            Ok(result) => {
                self.state.set_status(result.status);
                if let Ok(permit) = self.ctx.migration_permits.clone().acquire_owned().await {
                    self.migrate_now(permit).await?;
                }
                self.backend.reset_sequence();
                Ok(false)
            }
            Err(query::QueryError::Server(err)) => {
                // The client sees COMMIT's failure as its BEGIN's failure.
                let (seq, _) = self
                    .client
                    .read_packet(auth::MAX_HANDSHAKE_PACKET)
                    .await
                    .map_err(SessionError::Client)?;
                self.client
                    .write_packet(seq.wrapping_add(1), &err.encode())
                    .await
                    .map_err(SessionError::Client)?;
                Ok(true)
            }
            Err(query::QueryError::Conn(e)) => Err(SessionError::Backend(e)),
        }
    }

    /// Forwards one command and its response.
    async fn execute(&mut self, cmd: u8, len: usize) -> Result<(), SessionError> {
        let deprecate_eof = self.deprecate_eof();
        match cmd {
            command::CHANGE_USER => return self.change_user().await,
            command::BINLOG_DUMP | command::BINLOG_DUMP_GTID | command::REGISTER_SLAVE => {
                return self.refuse_command(cmd).await;
            }
            _ => {}
        }
        let stmt_id = if matches!(
            cmd,
            command::STMT_EXECUTE
                | command::STMT_FETCH
                | command::STMT_CLOSE
                | command::STMT_RESET
                | command::STMT_SEND_LONG_DATA
        ) && len >= 5
        {
            self.client.fill_to(9).await.map_err(SessionError::Client)?;
            let b = &self.client.buffered()[5..9];
            Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        } else {
            None
        };
        self.forward_request().await?;
        match cmd {
            command::STMT_CLOSE | command::STMT_SEND_LONG_DATA => {
                // No response; flush so the backend sees the request now.
                self.backend.flush().await.map_err(SessionError::Backend)?;
                if let Some(id) = stmt_id {
                    if cmd == command::STMT_CLOSE {
                        self.state.on_close_or_reset(id);
                    } else {
                        self.state.on_send_long_data(id);
                    }
                }
            }
            command::QUERY | command::STMT_EXECUTE | command::PROCESS_INFO => {
                let mut framing = ResultFraming::query(deprecate_eof);
                self.forward_results(&mut framing).await?;
                if let Some(s) = framing.last_status {
                    self.state.set_status(s);
                }
                if let (command::STMT_EXECUTE, Some(id)) = (cmd, stmt_id) {
                    if framing.error.is_none() {
                        self.state.on_execute(id, framing.last_status);
                    }
                }
            }
            command::STMT_FETCH | command::FIELD_LIST => {
                let mut framing = ResultFraming::rows(deprecate_eof);
                self.forward_results(&mut framing).await?;
                if let Some(s) = framing.last_status {
                    self.state.set_status(s);
                }
                if let (command::STMT_FETCH, Some(id)) = (cmd, stmt_id) {
                    self.state.on_fetch(id, framing.last_status);
                }
            }
            command::STMT_PREPARE => {
                let mut framing = PrepareFraming::new(deprecate_eof);
                self.forward_response(&mut framing).await?;
            }
            _ => {
                let mut framing = SinglePacket::default();
                self.forward_response(&mut framing).await?;
                if let Some(s) = framing.last_status {
                    self.state.set_status(s);
                }
                if framing.error.is_none() {
                    match (cmd, stmt_id) {
                        (command::STMT_RESET, Some(id)) => self.state.on_close_or_reset(id),
                        (command::RESET_CONNECTION, _) => self.state.on_session_reset(),
                        _ => {}
                    }
                }
            }
        }
        Ok(())
    }

    /// Streams the client's request packet (however large) to the backend.
    async fn forward_request(&mut self) -> Result<(), SessionError> {
        forward(&mut self.client, &mut self.backend, &mut OnePacket)
            .await
            .map_err(SessionError::Client)?;
        Ok(())
    }

    async fn forward_response<F: forward::Framing>(
        &mut self,
        framing: &mut F,
    ) -> Result<Step, SessionError> {
        forward(&mut self.backend, &mut self.client, framing)
            .await
            .map_err(SessionError::Backend)
    }

    /// Forwards a result-bearing response, relaying LOCAL INFILE data when asked.
    async fn forward_results(&mut self, framing: &mut ResultFraming) -> Result<(), SessionError> {
        while self.forward_response(framing).await? == Step::LocalInfile {
            forward(&mut self.client, &mut self.backend, &mut UntilEmptyPacket)
                .await
                .map_err(SessionError::Client)?;
        }
        Ok(())
    }

    /// `COM_CHANGE_USER`: re-authenticate through the backend, then adopt the new identity.
    async fn change_user(&mut self) -> Result<(), SessionError> {
        let (seq, request) = self
            .client
            .read_packet(auth::MAX_HANDSHAKE_PACKET)
            .await
            .map_err(SessionError::Client)?;
        let (original, rewritten) =
            auth::rewrite_change_user(&request, self.client_caps, self.backend_caps)?;
        let mut backend_seq = self
            .backend
            .write_packet(seq, &rewritten)
            .await
            .map_err(SessionError::Backend)?;
        let mut client_seq = seq.wrapping_add(1);
        let failed = auth::relay_auth(
            &mut self.client,
            &mut self.backend,
            &mut client_seq,
            &mut backend_seq,
        )
        .await?;
        if failed.is_none() {
            self.identity.user = original.user;
            self.identity.database = original.database;
            if let Some(c) = original.collation {
                self.identity.collation = c as u8;
            }
            if original.attrs.is_some() {
                self.identity.attrs = original.attrs;
            }
            self.state.on_session_reset();
        }
        Ok(())
    }

    /// Answers a command the proxy cannot frame with an error, after draining its request.
    async fn refuse_command(&mut self, cmd: u8) -> Result<(), SessionError> {
        let (seq, _) = self
            .client
            .read_packet(auth::MAX_HANDSHAKE_PACKET)
            .await
            .map_err(SessionError::Client)?;
        let err = ErrPacket::new(
            error_code::UNKNOWN_COM_ERROR,
            "08S01",
            format!(
                "Command {} is not supported through the proxy",
                command::name(cmd)
            ),
        );
        self.client
            .write_packet(seq.wrapping_add(1), &err.encode())
            .await
            .map_err(SessionError::Client)?;
        Ok(())
    }
}
