//! Sessions on one token for one key: finds the token (by label or slot id), logs in when the
//! token is not yet logged in for this process (login state is per token, not per session, so
//! this is once per token), finds the key, keeps up to `size` open sessions for reuse, and
//! recovers from sessions, logins, key handles or devices that went away underneath by reopening
//! everything, within a bounded number of attempts. Every function here blocks: callers run them
//! on tokio's blocking pool (or at startup, before serving). Knows nothing about blobs or tenants.

use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use cryptoki::context::{Function, Pkcs11};
use cryptoki::error::{Error, RvError};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, SessionState, UserType};
use cryptoki::slot::Slot;
use secrecy::SecretString;

use super::super::ProviderError;

/// Attempts of one operation, the first included, before the root is reported unavailable.
pub const ATTEMPTS: u32 = 4;

/// Pause before attempt `n` (1-based retries): 25 ms, 100 ms, 400 ms. Long enough for a network
/// HSM's session table or a USB token to settle, short enough to stay inside request timeouts.
fn backoff(retry: u32) -> Duration {
    Duration::from_millis(25 * 4u64.pow(retry.saturating_sub(1)))
}

/// Which token to use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSelector {
    Label(String),
    Slot(u64),
}

/// Which key to use: by label, by CKA_ID, or both.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeySelector {
    pub label: Option<String>,
    pub id: Option<Vec<u8>>,
}

impl KeySelector {
    /// `label "kek", id 0a0b`, for messages.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(l) = &self.label {
            parts.push(format!("label {l:?}"));
        }
        if let Some(id) = &self.id {
            parts.push(format!("id {}", hex::encode(id)));
        }
        parts.join(", ")
    }

    fn template(&self) -> Vec<Attribute> {
        let mut t = vec![
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
        ];
        if let Some(l) = &self.label {
            t.push(Attribute::Label(l.as_bytes().to_vec()));
        }
        if let Some(id) = &self.id {
            t.push(Attribute::Id(id.clone()));
        }
        t
    }
}

/// Why the token or key could not be reached, with a message that names them.
#[derive(Debug)]
pub struct Trouble {
    /// `true` when retrying cannot help: the PIN was refused or the key is gone.
    pub refused: bool,
    pub message: String,
}

impl Trouble {
    fn transient(message: String) -> Self {
        Trouble {
            refused: false,
            message,
        }
    }

    fn refused(message: String) -> Self {
        Trouble {
            refused: true,
            message,
        }
    }
}

/// Whether a failed call means the session, the login, the key handle or the device went away,
/// so that the same call on freshly opened sessions may succeed.
pub fn session_lost(e: &Error) -> bool {
    matches!(
        e,
        Error::Pkcs11(
            RvError::SessionHandleInvalid
                | RvError::SessionClosed
                | RvError::DeviceRemoved
                | RvError::DeviceError
                | RvError::TokenNotPresent
                | RvError::TokenNotRecognized
                | RvError::SlotIdInvalid
                | RvError::UserNotLoggedIn
                | RvError::KeyHandleInvalid
                | RvError::ObjectHandleInvalid
                | RvError::CryptokiNotInitialized,
            _
        )
    )
}

/// One session lent out to an operation.
struct Lease {
    session: Session,
    key: ObjectHandle,
    generation: u64,
}

/// Where the key is, as found by the current generation of sessions.
#[derive(Clone, Copy)]
struct Target {
    slot: Slot,
    key: ObjectHandle,
}

struct State {
    /// Bumped whenever sessions are found lost: idle sessions and the cached target of an older
    /// generation are not reused.
    generation: u64,
    target: Option<Target>,
    idle: Vec<Session>,
}

/// The sessions of one root on one token.
pub struct TokenSessions {
    module: Pkcs11,
    module_path: PathBuf,
    token: TokenSelector,
    key: KeySelector,
    pin: SecretString,
    size: usize,
    state: Mutex<State>,
    /// Serialises logins, so concurrent first uses do not all present the PIN.
    login: Mutex<()>,
}

/// What opening found, for the startup checks and `hsm check`.
pub struct Opened {
    pub slot: Slot,
    pub token_label: String,
    pub key: ObjectHandle,
}

impl TokenSessions {
    /// Finds the token, opens a first session, logs in and finds the key, reporting the token
    /// and the login as they succeed. Any failure is a setup error whose message names the
    /// module, token or key.
    pub fn open(
        module: Pkcs11,
        module_path: PathBuf,
        token: TokenSelector,
        key: KeySelector,
        pin: SecretString,
        size: usize,
        report: &mut dyn FnMut(&str, &str),
    ) -> Result<(Self, Opened), ProviderError> {
        let sessions = TokenSessions {
            module,
            module_path,
            token,
            key,
            pin,
            size: size.max(1),
            state: Mutex::new(State {
                generation: 0,
                target: None,
                idle: Vec::new(),
            }),
            login: Mutex::new(()),
        };
        let (slot, token_label) = sessions
            .find_slot()
            .map_err(|t| ProviderError::Setup(t.message))?;
        let session = sessions.module.open_ro_session(slot).map_err(|e| {
            ProviderError::Setup(format!("token {token_label:?}: {}", describe(&e)))
        })?;
        report("token", &format!("{token_label:?} in slot {}", slot.id()));
        sessions
            .ensure_login(&session, &token_label)
            .map_err(|t| ProviderError::Setup(t.message))?;
        report("login", "the user is logged in");
        let key = sessions
            .find_key(&session, &token_label)
            .map_err(|t| ProviderError::Setup(t.message))?;
        {
            let mut st = sessions.lock();
            st.target = Some(Target { slot, key });
            st.idle.push(session);
        }
        Ok((
            sessions,
            Opened {
                slot,
                token_label,
                key,
            },
        ))
    }

    pub fn module(&self) -> &Pkcs11 {
        &self.module
    }

    /// Runs `op` on a pooled session with the key's current handle. Lost sessions are replaced
    /// and `op` is tried again, up to `ATTEMPTS` times in all. The outer error is the token's
    /// (unavailable, or refused after a re-login); the inner one is `op`'s own failure, for the
    /// caller to interpret (a failed tag is not an outage).
    pub fn call<T>(
        &self,
        root: &str,
        op: &dyn Fn(&Session, ObjectHandle) -> Result<T, Error>,
    ) -> Result<Result<T, Error>, ProviderError> {
        let mut last = String::new();
        for attempt in 0..ATTEMPTS {
            if attempt > 0 {
                std::thread::sleep(backoff(attempt));
            }
            let lease = match self.checkout() {
                Ok(l) => l,
                Err(t) if t.refused => {
                    tracing::error!(root, error = %t.message, "PKCS#11 token refused the root");
                    return Err(ProviderError::AccessDenied {
                        root: root.to_owned(),
                    });
                }
                Err(t) => {
                    tracing::warn!(root, attempt, error = %t.message, "PKCS#11 token not reachable");
                    last = t.message;
                    continue;
                }
            };
            match op(&lease.session, lease.key) {
                Err(e) if session_lost(&e) => {
                    last = describe(&e);
                    tracing::warn!(root, attempt, error = %last,
                        "PKCS#11 session lost; reopening sessions");
                    self.invalidate(lease.generation);
                    discard(lease.session);
                }
                Err(e @ Error::Pkcs11(RvError::OperationActive, _)) => {
                    // Only this session is stuck in an earlier operation; drop it alone.
                    last = describe(&e);
                    discard(lease.session);
                }
                result => {
                    self.checkin(lease);
                    return Ok(result);
                }
            }
        }
        Err(ProviderError::Unavailable {
            root: root.to_owned(),
            reason: format!("PKCS#11 token still failing after {ATTEMPTS} attempts: {last}"),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state stays consistent across a panic in another holder (only pushes and pops).
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn checkout(&self) -> Result<Lease, Trouble> {
        let (generation, target) = {
            let mut st = self.lock();
            if let Some(target) = st.target
                && let Some(session) = st.idle.pop()
            {
                return Ok(Lease {
                    session,
                    key: target.key,
                    generation: st.generation,
                });
            }
            (st.generation, st.target)
        };
        // Open outside the lock: a network HSM may take a while, and others may proceed.
        let (session, target) = match target {
            Some(t) => {
                let label = self.token_name();
                let session = self.open_session(t.slot, &label)?;
                self.ensure_login(&session, &label)?;
                (session, t)
            }
            None => {
                if matches!(
                    self.module.get_slots_with_token(),
                    Err(Error::Pkcs11(RvError::CryptokiNotInitialized, _))
                ) {
                    self.reinitialize()?;
                }
                let (slot, label) = self.find_slot()?;
                let session = self.open_session(slot, &label)?;
                self.ensure_login(&session, &label)?;
                let key = self.find_key(&session, &label)?;
                (session, Target { slot, key })
            }
        };
        let mut st = self.lock();
        if st.generation == generation && st.target.is_none() {
            st.target = Some(target);
        }
        Ok(Lease {
            session,
            key: target.key,
            generation,
        })
    }

    fn checkin(&self, lease: Lease) {
        let spare = {
            let mut st = self.lock();
            if lease.generation == st.generation && st.idle.len() < self.size {
                st.idle.push(lease.session);
                None
            } else {
                Some(lease.session)
            }
        };
        // A session of an older generation, or one over the pool size, is closed.
        if let Some(s) = spare {
            discard(s);
        }
    }

    /// Marks every session of `generation` lost: the next checkout reopens, logs in again if the
    /// token needs it, and finds the key again (its handle may have changed).
    fn invalidate(&self, generation: u64) {
        let stale = {
            let mut st = self.lock();
            if st.generation != generation {
                return;
            }
            st.generation += 1;
            st.target = None;
            std::mem::take(&mut st.idle)
        };
        for s in stale {
            discard(s);
        }
    }

    fn reinitialize(&self) -> Result<(), Trouble> {
        // Someone called C_Finalize on the module; initialise it again for this process.
        use cryptoki::context::{CInitializeArgs, CInitializeFlags};
        match self
            .module
            .initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        {
            Ok(()) | Err(Error::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => Ok(()),
            Err(e) => Err(Trouble::transient(format!(
                "PKCS#11 module {}: {}",
                self.module_path.display(),
                describe(&e)
            ))),
        }
    }

    fn token_name(&self) -> String {
        match &self.token {
            TokenSelector::Label(l) => l.clone(),
            TokenSelector::Slot(s) => format!("in slot {s}"),
        }
    }

    fn open_session(&self, slot: Slot, label: &str) -> Result<Session, Trouble> {
        self.module
            .open_ro_session(slot)
            .map_err(|e| Trouble::transient(format!("token {label:?}: {}", describe(&e))))
    }

    /// The slot holding the configured token, and the token's label.
    fn find_slot(&self) -> Result<(Slot, String), Trouble> {
        let module = self.module_path.display();
        let slots = self.module.get_slots_with_token().map_err(|e| {
            Trouble::transient(format!("PKCS#11 module {module}: {}", describe(&e)))
        })?;
        let mut labels = Vec::new();
        let mut found = Vec::new();
        for slot in slots {
            let Ok(info) = self.module.get_token_info(slot) else {
                continue;
            };
            if !info.token_initialized() {
                continue;
            }
            let label = info.label().trim_end().to_owned();
            let wanted = match &self.token {
                TokenSelector::Label(l) => *l == label,
                TokenSelector::Slot(id) => *id == slot.id(),
            };
            if wanted {
                found.push((slot, label.clone()));
            }
            labels.push(format!("{label:?} (slot {})", slot.id()));
        }
        let present = if labels.is_empty() {
            "none".to_owned()
        } else {
            labels.join(", ")
        };
        match (found.len(), &self.token) {
            (1, _) => Ok(found.remove(0)),
            (0, TokenSelector::Label(l)) => Err(Trouble::transient(format!(
                "no token labelled {l:?} in PKCS#11 module {module} (tokens present: {present})"
            ))),
            (0, TokenSelector::Slot(s)) => Err(Trouble::transient(format!(
                "no token in slot {s} of PKCS#11 module {module} (tokens present: {present})"
            ))),
            (n, _) => Err(Trouble::refused(format!(
                "{n} tokens labelled {:?} in PKCS#11 module {module}; set slot_id instead",
                self.token_name()
            ))),
        }
    }

    /// Logs the user in unless the token already is for this process. Login state belongs to
    /// the token (all of a process's sessions share it), so this presents the PIN once per token,
    /// and again only after something logged the token out.
    fn ensure_login(&self, session: &Session, label: &str) -> Result<(), Trouble> {
        let _one_at_a_time = self.login.lock().unwrap_or_else(|p| p.into_inner());
        let state = session
            .get_session_info()
            .map_err(|e| Trouble::transient(format!("token {label:?}: {}", describe(&e))))?
            .session_state();
        if matches!(state, SessionState::RoUser | SessionState::RwUser) {
            return Ok(());
        }
        match session.login(UserType::User, Some(&self.pin)) {
            Ok(()) | Err(Error::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => Ok(()),
            Err(Error::Pkcs11(
                rv @ (RvError::PinIncorrect
                | RvError::PinLocked
                | RvError::PinExpired
                | RvError::PinLenRange
                | RvError::PinInvalid
                | RvError::UserPinNotInitialized),
                _,
            )) => Err(Trouble::refused(format!(
                "token {label:?}: login refused: {} ({})",
                match rv {
                    RvError::PinIncorrect => "wrong user PIN",
                    RvError::PinLocked => "the user PIN is locked",
                    RvError::PinExpired => "the user PIN has expired",
                    RvError::UserPinNotInitialized => "the token has no user PIN yet",
                    _ => "the user PIN is not valid for this token",
                },
                ckr_name(rv),
            ))),
            Err(e) => Err(Trouble::transient(format!(
                "token {label:?}: {}",
                describe(&e)
            ))),
        }
    }

    /// The one AES key matching the selector.
    fn find_key(&self, session: &Session, label: &str) -> Result<ObjectHandle, Trouble> {
        let found = session
            .find_objects(&self.key.template())
            .map_err(|e| Trouble::transient(format!("token {label:?}: {}", describe(&e))))?;
        match found.as_slice() {
            [one] => Ok(*one),
            [] => Err(Trouble::refused(format!(
                "token {label:?}: no AES secret key with {} (create one with `kms-sidecar hsm init-key`)",
                self.key.describe()
            ))),
            many => Err(Trouble::refused(format!(
                "token {label:?}: {} AES keys match {}; set key_id to choose one",
                many.len(),
                self.key.describe()
            ))),
        }
    }

    /// Reads attributes of the key on a pooled session.
    pub fn key_attributes(
        &self,
        root: &str,
        types: &[AttributeType],
    ) -> Result<Vec<Attribute>, ProviderError> {
        let types = types.to_vec();
        self.call(root, &|s, key| s.get_attributes(key, &types))?
            .map_err(|e| ProviderError::Setup(format!("{root}: {}", describe(&e))))
    }
}

impl Drop for TokenSessions {
    fn drop(&mut self) {
        let idle = std::mem::take(&mut self.lock().idle);
        for s in idle {
            discard(s);
        }
    }
}

/// Closes a session we no longer want. A session the token already forgot is not closed again:
/// cryptoki would log the expected CKR_SESSION_HANDLE_INVALID as an error.
fn discard(session: Session) {
    match session.get_session_info() {
        Err(Error::Pkcs11(
            RvError::SessionHandleInvalid
            | RvError::SessionClosed
            | RvError::DeviceRemoved
            | RvError::CryptokiNotInitialized,
            _,
        )) => std::mem::forget(session),
        _ => drop(session),
    }
}

/// `C_Login: CKR_PIN_INCORRECT`: the PKCS#11 names, which operators can search vendor
/// documentation for (cryptoki's own messages quote the specification at length instead).
pub fn describe(e: &Error) -> String {
    match e {
        Error::Pkcs11(rv, function) => format!("C_{function:?}: {}", ckr_name(*rv)),
        other => other.to_string(),
    }
}

/// `CKR_SESSION_HANDLE_INVALID` from `RvError::SessionHandleInvalid`.
pub fn ckr_name(rv: RvError) -> String {
    let mut out = String::from("CKR");
    for c in format!("{rv:?}").chars() {
        if c.is_ascii_uppercase() {
            out.push('_');
        }
        out.push(c.to_ascii_uppercase());
    }
    out
}

/// A `Function` value for synthesised errors (a health check that finds the token logged out).
pub fn not_logged_in() -> Error {
    Error::Pkcs11(RvError::UserNotLoggedIn, Function::GetSessionInfo)
}
