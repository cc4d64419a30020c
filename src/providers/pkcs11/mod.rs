//! The PKCS#11 HSM root: a non-extractable AES-256 key in a token, used through the module's
//! C_Encrypt/C_Decrypt to wrap and unwrap data keys that the host generated. Wraps with
//! CKM_AES_GCM (the wrap context as AAD), or CKM_AES_KEY_WRAP_PAD where a token lacks GCM (the
//! context then bound by a hash inside the wrapped bytes); the blob's first byte records which, so
//! unwrap always picks the right mechanism. Every PKCS#11 call runs on tokio's blocking pool,
//! bounded by the configured number of sessions. The key never leaves the token, and the PIN
//! lives only in a zeroizing secret. Blob layout: docs/envelope.md; vendor notes: hsm/README.md.

pub mod blob;
pub mod module;
pub mod session;

use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use cryptoki::error::{Error, RvError};
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass};
use cryptoki::session::{Session, SessionState, UserType};
use cryptoki::types::Ulong;
use secrecy::SecretString;
use serde::Deserialize;
use tokio::sync::Semaphore;
use zeroize::Zeroizing;

use self::blob::{Blob, GCM_IV_LEN, WrapMechanism};
use self::session::{KeySelector, TokenSelector, TokenSessions, describe};
use super::{ProviderError, RootId, RootProvider, WrapContext, WrapPurpose};
use crate::crypto::keys::KEY_LEN;
use crate::crypto::{DataKey, fill_random};
use crate::tenant::TenantId;

/// Sessions per root when `sessions` is not set.
pub const DEFAULT_SESSIONS: usize = 4;
/// Upper bound on `sessions`: tokens limit sessions per application, often to a few dozen.
pub const MAX_SESSIONS: usize = 256;

/// Which mechanism new wraps use.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MechanismChoice {
    /// AES-GCM if the token offers it for encrypt and decrypt, otherwise AES key wrap with padding.
    #[default]
    Auto,
    AesGcm,
    AesKeyWrapPad,
}

/// `[[roots]]` with `kind = "pkcs11"`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pkcs11Config {
    /// The PKCS#11 module (shared library), e.g. `/usr/lib/softhsm/libsofthsm2.so`.
    pub module: PathBuf,
    /// The token's label; or `slot_id`.
    pub token_label: Option<String>,
    pub slot_id: Option<u64>,
    /// A file (mode 0600, owned by the sidecar's user) holding the user PIN; or `pin_env`.
    pub pin_file: Option<PathBuf>,
    pub pin_env: Option<String>,
    /// The key's CKA_LABEL and/or CKA_ID (hex).
    pub key_label: Option<String>,
    pub key_id: Option<String>,
    /// Sessions kept open and PKCS#11 calls in flight at once.
    #[serde(default = "default_sessions")]
    pub sessions: usize,
    #[serde(default)]
    pub mechanism: MechanismChoice,
}

fn default_sessions() -> usize {
    DEFAULT_SESSIONS
}

impl Pkcs11Config {
    /// Checks the settings on their own; errors are `(key, message)` so the caller can name
    /// `roots[i].key`.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.module.as_os_str().is_empty() {
            return Err(("module", "must name the PKCS#11 module (.so)".into()));
        }
        match (&self.token_label, self.slot_id) {
            (Some(_), Some(_)) => {
                return Err(("token_label", "set token_label or slot_id, not both".into()));
            }
            (None, None) => return Err(("token_label", "set token_label or slot_id".into())),
            (Some(l), None) if l.is_empty() || l.len() > 32 => {
                return Err(("token_label", "must be 1 to 32 bytes".into()));
            }
            _ => {}
        }
        match (&self.pin_file, &self.pin_env) {
            (Some(_), Some(_)) => {
                return Err(("pin_file", "set pin_file or pin_env, not both".into()));
            }
            (None, None) => return Err(("pin_file", "set pin_file or pin_env".into())),
            _ => {}
        }
        if self.key_label.is_none() && self.key_id.is_none() {
            return Err(("key_label", "set key_label and/or key_id".into()));
        }
        if self.key_label.as_deref() == Some("") {
            return Err(("key_label", "must not be empty".into()));
        }
        self.key_id_bytes()?;
        if !(1..=MAX_SESSIONS).contains(&self.sessions) {
            return Err(("sessions", format!("must be between 1 and {MAX_SESSIONS}")));
        }
        Ok(())
    }

    fn key_id_bytes(&self) -> Result<Option<Vec<u8>>, (&'static str, String)> {
        match &self.key_id {
            None => Ok(None),
            Some(h) => match hex::decode(h) {
                Ok(b) if !b.is_empty() => Ok(Some(b)),
                _ => Err(("key_id", "must be non-empty hex, e.g. \"0a1b\"".into())),
            },
        }
    }

    fn selectors(&self) -> Result<(TokenSelector, KeySelector), ProviderError> {
        let token = match (&self.token_label, self.slot_id) {
            (Some(l), _) => TokenSelector::Label(l.clone()),
            (None, Some(s)) => TokenSelector::Slot(s),
            (None, None) => {
                return Err(ProviderError::Setup(
                    "pkcs11: no token_label or slot_id".into(),
                ));
            }
        };
        let id = self
            .key_id_bytes()
            .map_err(|(k, m)| ProviderError::Setup(format!("pkcs11 {k}: {m}")))?;
        Ok((
            token,
            KeySelector {
                label: self.key_label.clone(),
                id,
            },
        ))
    }
}

/// A PKCS#11 root, connected.
pub struct Pkcs11Root {
    inner: Arc<Inner>,
    /// One permit per session: callers beyond the pool wait here, not on blocking threads.
    permits: Arc<Semaphore>,
}

struct Inner {
    id: RootId,
    sessions: TokenSessions,
    /// What new wraps use.
    mechanism: WrapMechanism,
    /// What this token can do with C_Encrypt/C_Decrypt.
    supported: Vec<WrapMechanism>,
    token_label: String,
    slot_id: u64,
}

impl Pkcs11Root {
    /// Loads the module (once per process), finds the token, logs in, finds the key, picks the
    /// mechanism and proves a wrap/unwrap round trip. Blocking: call at startup or from a
    /// blocking context. Every failure is `ProviderError::Setup` naming the module, token or key.
    pub fn connect(cfg: &Pkcs11Config, pin: SecretString) -> Result<Self, ProviderError> {
        Self::connect_reporting(cfg, pin, &mut |_, _| {})
    }

    /// `connect`, reporting each step as it succeeds (for `kms-sidecar hsm check`).
    pub fn connect_reporting(
        cfg: &Pkcs11Config,
        pin: SecretString,
        report: &mut dyn FnMut(&str, &str),
    ) -> Result<Self, ProviderError> {
        cfg.validate()
            .map_err(|(k, m)| ProviderError::Setup(format!("pkcs11 {k}: {m}")))?;
        let (token, key) = cfg.selectors()?;
        let module = module::module(&cfg.module).map_err(ProviderError::Setup)?;
        report("module", &module_description(&module, &cfg.module));
        let (sessions, opened) = TokenSessions::open(
            module,
            cfg.module.clone(),
            token,
            key.clone(),
            pin,
            cfg.sessions,
            report,
        )?;
        let token_label = opened.token_label.clone();
        let id_suffix = match (&key.label, &key.id) {
            (Some(l), _) => l.clone(),
            (None, Some(id)) => format!("id={}", hex::encode(id)),
            (None, None) => String::new(),
        };
        let id = RootId::new(format!("pkcs11:{token_label}/{id_suffix}"));
        let attrs = sessions.key_attributes(id.as_str(), &KEY_FACTS)?;
        let facts = KeyFacts::from_attributes(&attrs);
        facts.check(&token_label, &key.describe())?;
        report("key", &format!("{} ({})", key.describe(), facts.summary()));
        if !facts.sensitive || facts.extractable {
            tracing::warn!(root = %id, "the HSM key is extractable or not sensitive: it can leave the token");
        }

        let mut supported = Vec::new();
        for m in [WrapMechanism::AesGcm, WrapMechanism::AesKeyWrapPad] {
            let ty = match m {
                WrapMechanism::AesGcm => MechanismType::AES_GCM,
                WrapMechanism::AesKeyWrapPad => MechanismType::AES_KEY_WRAP_PAD,
            };
            if let Ok(info) = sessions.module().get_mechanism_info(opened.slot, ty)
                && info.encrypt()
                && info.decrypt()
            {
                supported.push(m);
            }
        }
        let mechanism = match cfg.mechanism {
            MechanismChoice::Auto => supported.first().copied().ok_or_else(|| {
                ProviderError::Setup(format!(
                    "token {token_label:?} offers neither CKM_AES_GCM nor CKM_AES_KEY_WRAP_PAD for encrypt/decrypt"
                ))
            })?,
            MechanismChoice::AesGcm => WrapMechanism::AesGcm,
            MechanismChoice::AesKeyWrapPad => WrapMechanism::AesKeyWrapPad,
        };
        if !supported.contains(&mechanism) {
            return Err(ProviderError::Setup(format!(
                "token {token_label:?} does not offer {} for encrypt/decrypt (mechanism = {:?})",
                mechanism.ckm(),
                mechanism.name()
            )));
        }
        report(
            "mechanism",
            &format!(
                "wrapping with {} (token offers: {})",
                mechanism.ckm(),
                supported
                    .iter()
                    .map(|m| m.ckm())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        );
        let inner = Inner {
            id,
            sessions,
            mechanism,
            supported,
            token_label,
            slot_id: opened.slot.id(),
        };
        inner.self_test(mechanism)?;
        report(
            "self-test",
            &format!(
                "wrap/unwrap with {} round-trips; a tampered blob is refused",
                mechanism.ckm()
            ),
        );
        Ok(Pkcs11Root {
            inner: Arc::new(inner),
            permits: Arc::new(Semaphore::new(cfg.sessions.max(1))),
        })
    }

    pub fn token_label(&self) -> &str {
        &self.inner.token_label
    }

    pub fn slot_id(&self) -> u64 {
        self.inner.slot_id
    }

    /// The mechanism new wraps use.
    pub fn mechanism(&self) -> WrapMechanism {
        self.inner.mechanism
    }

    /// The mechanisms the token offers for C_Encrypt/C_Decrypt, preferred first.
    pub fn supported_mechanisms(&self) -> &[WrapMechanism] {
        &self.inner.supported
    }

    /// A wrap/unwrap round trip and a tamper check with `mechanism`, on the blocking pool.
    pub async fn self_test(&self, mechanism: WrapMechanism) -> Result<(), ProviderError> {
        self.offload(move |inner| inner.self_test(mechanism))
            .await?
    }

    /// Wraps with a given mechanism rather than the configured one.
    pub async fn wrap_with(
        &self,
        mechanism: WrapMechanism,
        dek: &DataKey,
        ctx: &WrapContext<'_>,
    ) -> Result<Vec<u8>, ProviderError> {
        let dek = Zeroizing::new(*dek.expose());
        let aad = ctx.aad();
        self.offload(move |inner| inner.wrap(mechanism, &dek, &aad))
            .await?
    }

    /// Runs `f` on tokio's blocking pool once a session permit is free.
    async fn offload<T, F>(&self, f: F) -> Result<T, ProviderError>
    where
        T: Send + 'static,
        F: FnOnce(&Inner) -> T + Send + 'static,
    {
        let unavailable = |reason: &str| ProviderError::Unavailable {
            root: self.inner.id.to_string(),
            reason: reason.into(),
        };
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| unavailable("session pool closed"))?;
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            f(&inner)
        })
        .await
        .map_err(|_| unavailable("PKCS#11 call task failed"))
    }
}

#[async_trait]
impl RootProvider for Pkcs11Root {
    fn id(&self) -> &RootId {
        &self.inner.id
    }

    async fn wrap(&self, dek: &DataKey, ctx: &WrapContext<'_>) -> Result<Vec<u8>, ProviderError> {
        self.wrap_with(self.inner.mechanism, dek, ctx).await
    }

    async fn unwrap(&self, blob: &[u8], ctx: &WrapContext<'_>) -> Result<DataKey, ProviderError> {
        let blob = blob.to_vec();
        let aad = ctx.aad();
        self.offload(move |inner| inner.unwrap(&blob, &aad)).await?
    }

    async fn health(&self) -> Result<(), ProviderError> {
        self.offload(|inner| inner.health()).await?
    }
}

impl Inner {
    fn root(&self) -> &str {
        self.id.as_str()
    }

    fn wrap(
        &self,
        mechanism: WrapMechanism,
        dek: &[u8; KEY_LEN],
        aad: &[u8],
    ) -> Result<Vec<u8>, ProviderError> {
        let built = match mechanism {
            WrapMechanism::AesGcm => {
                let mut iv = [0u8; GCM_IV_LEN];
                fill_random(&mut iv)?;
                let (iv, out) = self
                    .sessions
                    .call(self.root(), &|s, key| gcm_encrypt(s, key, iv, aad, dek))?
                    .map_err(|e| self.call_failed(e))?;
                blob::gcm_blob(&iv, &out)
            }
            WrapMechanism::AesKeyWrapPad => {
                let dek = DataKey::from_slice(dek)?;
                let plain = blob::kwp_plaintext(&dek, aad);
                let out = self
                    .sessions
                    .call(self.root(), &|s, key| {
                        s.encrypt(&Mechanism::AesKeyWrapPad, key, &plain[..])
                    })?
                    .map_err(|e| self.call_failed(e))?;
                blob::kwp_blob(&out)
            }
        };
        built.ok_or_else(|| ProviderError::Unavailable {
            root: self.id.to_string(),
            reason: format!(
                "the token returned an unexpected length from {}",
                mechanism.ckm()
            ),
        })
    }

    fn unwrap(&self, bytes: &[u8], aad: &[u8]) -> Result<DataKey, ProviderError> {
        let failed = || ProviderError::UnwrapFailed {
            root: self.id.to_string(),
        };
        let parsed = Blob::parse(bytes).ok_or_else(failed)?;
        let result = match parsed {
            Blob::Gcm {
                iv,
                ciphertext_and_tag,
            } => self.sessions.call(self.root(), &|s, key| {
                let mut iv = *iv;
                let params = GcmParams::new(&mut iv, aad, Ulong::from(128))?;
                s.decrypt(&Mechanism::AesGcm(params), key, &ciphertext_and_tag[..])
                    .map(Zeroizing::new)
            })?,
            Blob::Kwp { wrapped } => self.sessions.call(self.root(), &|s, key| {
                s.decrypt(&Mechanism::AesKeyWrapPad, key, &wrapped[..])
                    .map(Zeroizing::new)
            })?,
        };
        let plain = match result {
            Ok(p) => p,
            Err(e) if authentication_failed(&e) => return Err(failed()),
            Err(e) => return Err(self.call_failed(e)),
        };
        match parsed {
            Blob::Gcm { .. } => DataKey::from_slice(&plain).map_err(|_| failed()),
            Blob::Kwp { .. } => blob::kwp_open(&plain, aad).ok_or_else(failed),
        }
    }

    fn health(&self) -> Result<(), ProviderError> {
        self.sessions
            .call(self.root(), &|s, _| {
                match s.get_session_info()?.session_state() {
                    SessionState::RoUser | SessionState::RwUser => Ok(()),
                    // Logged out underneath: let the pool log in again.
                    _ => Err(session::not_logged_in()),
                }
            })?
            .map_err(|e| self.call_failed(e))
    }

    /// A wrap and unwrap of a random key under a context no tenant can have, and a check that
    /// a tampered blob is refused.
    fn self_test(&self, mechanism: WrapMechanism) -> Result<(), ProviderError> {
        let tenant = TenantId::parse("kms-sidecar.self-test")
            .map_err(|_| ProviderError::Setup("self-test tenant id".into()))?;
        let ctx = WrapContext {
            tenant: &tenant,
            key_version: 0,
            purpose: WrapPurpose::TenantDek,
        };
        let aad = ctx.aad();
        let dek = DataKey::generate()?;
        let fail = |what: &str| {
            ProviderError::Setup(format!(
                "token {:?}: self-test with {} failed: {what}",
                self.token_label,
                mechanism.ckm()
            ))
        };
        let blob = self
            .wrap(mechanism, dek.expose(), &aad)
            .map_err(|e| fail(&e.to_string()))?;
        let back = self.unwrap(&blob, &aad).map_err(|e| fail(&e.to_string()))?;
        if back != dek {
            return Err(fail("unwrap returned another key"));
        }
        let mut tampered = blob.clone();
        if let Some(last) = tampered.last_mut() {
            *last ^= 0x01;
        }
        match self.unwrap(&tampered, &aad) {
            Err(ProviderError::UnwrapFailed { .. }) => Ok(()),
            Ok(_) => Err(fail("a tampered blob unwrapped")),
            Err(e) => Err(fail(&format!("a tampered blob gave {e}"))),
        }
    }

    /// An operation's own failure (not a lost session), past the retries.
    fn call_failed(&self, e: Error) -> ProviderError {
        match e {
            Error::Pkcs11(RvError::KeyFunctionNotPermitted | RvError::KeyTypeInconsistent, _) => {
                tracing::error!(root = %self.id, error = %describe(&e), "the HSM key may not be used this way");
                ProviderError::AccessDenied {
                    root: self.id.to_string(),
                }
            }
            e => ProviderError::Unavailable {
                root: self.id.to_string(),
                reason: describe(&e),
            },
        }
    }
}

fn gcm_encrypt(
    s: &Session,
    key: cryptoki::object::ObjectHandle,
    iv: [u8; GCM_IV_LEN],
    aad: &[u8],
    dek: &[u8; KEY_LEN],
) -> Result<([u8; GCM_IV_LEN], Vec<u8>), Error> {
    let mut iv = iv;
    let out = {
        let params = GcmParams::new(&mut iv, aad, Ulong::from(128))?;
        s.encrypt(&Mechanism::AesGcm(params), key, dek)?
    };
    // Read back: tokens that generate the IV themselves (FIPS modes) write it into the params.
    Ok((iv, out))
}

/// What a token returns when a blob does not authenticate: SoftHSM 2.6 reports a failed GCM tag
/// as CKR_GENERAL_ERROR; the specification's CKR_ENCRYPTED_DATA_INVALID and _LEN_RANGE are what
/// other tokens return, for GCM and for key wrap alike.
fn authentication_failed(e: &Error) -> bool {
    matches!(
        e,
        Error::Pkcs11(
            RvError::GeneralError
                | RvError::EncryptedDataInvalid
                | RvError::EncryptedDataLenRange
                | RvError::DataLenRange
                | RvError::MechanismInvalid
                | RvError::MechanismParamInvalid,
            _
        )
    )
}

const KEY_FACTS: [AttributeType; 7] = [
    AttributeType::KeyType,
    AttributeType::ValueLen,
    AttributeType::Sensitive,
    AttributeType::Extractable,
    AttributeType::Encrypt,
    AttributeType::Decrypt,
    AttributeType::Token,
];

/// What the startup checks need to know about the key.
#[derive(Debug, Default)]
struct KeyFacts {
    aes: bool,
    len: Option<u64>,
    sensitive: bool,
    extractable: bool,
    encrypt: bool,
    decrypt: bool,
    token: bool,
}

impl KeyFacts {
    fn from_attributes(attrs: &[Attribute]) -> Self {
        let mut f = KeyFacts::default();
        for a in attrs {
            match a {
                Attribute::KeyType(t) => f.aes = *t == KeyType::AES,
                Attribute::ValueLen(l) => f.len = Some(u64::from(*l)),
                Attribute::Sensitive(b) => f.sensitive = *b,
                Attribute::Extractable(b) => f.extractable = *b,
                Attribute::Encrypt(b) => f.encrypt = *b,
                Attribute::Decrypt(b) => f.decrypt = *b,
                Attribute::Token(b) => f.token = *b,
                _ => {}
            }
        }
        f
    }

    fn check(&self, token: &str, key: &str) -> Result<(), ProviderError> {
        let problem = if !self.aes {
            Some("is not an AES key".to_owned())
        } else if self.len.is_some_and(|l| l != KEY_LEN as u64) {
            Some(format!(
                "is AES-{}; an AES-256 key is required",
                self.len.unwrap_or(0) * 8
            ))
        } else if !self.encrypt || !self.decrypt {
            Some("lacks CKA_ENCRYPT or CKA_DECRYPT".to_owned())
        } else {
            None
        };
        match problem {
            Some(p) => Err(ProviderError::Setup(format!(
                "token {token:?}: the key with {key} {p}"
            ))),
            None => Ok(()),
        }
    }

    fn summary(&self) -> String {
        format!(
            "AES-{}, {}, {}, {}",
            self.len.unwrap_or(0) * 8,
            if self.sensitive {
                "sensitive"
            } else {
                "NOT sensitive"
            },
            if self.extractable {
                "EXTRACTABLE"
            } else {
                "not extractable"
            },
            if self.token {
                "token object"
            } else {
                "session object"
            },
        )
    }
}

fn module_description(module: &cryptoki::context::Pkcs11, path: &std::path::Path) -> String {
    match module.get_library_info() {
        Ok(info) => format!(
            "{} ({} {}, library {}.{}, Cryptoki {}.{})",
            path.display(),
            info.manufacturer_id().trim_end(),
            info.library_description().trim_end(),
            info.library_version().major(),
            info.library_version().minor(),
            info.cryptoki_version().major(),
            info.cryptoki_version().minor(),
        ),
        Err(_) => path.display().to_string(),
    }
}

/// A key created by `create_key`.
pub struct CreatedKey {
    pub token_label: String,
    pub label: String,
    pub id: Vec<u8>,
}

/// Creates the root key in the token: AES-256, a token object, private, sensitive, never
/// extractable, usable only to encrypt and decrypt. Refuses a label already in use. Blocking.
pub fn create_key(
    cfg: &Pkcs11Config,
    pin: &SecretString,
    label: &str,
    id: Option<Vec<u8>>,
) -> Result<CreatedKey, ProviderError> {
    if label.is_empty() {
        return Err(ProviderError::Setup(
            "the key label must not be empty".into(),
        ));
    }
    let (token, _) = cfg.selectors()?;
    let module = module::module(&cfg.module).map_err(ProviderError::Setup)?;
    let slots = module.get_slots_with_token().map_err(|e| {
        ProviderError::Setup(format!(
            "PKCS#11 module {}: {}",
            cfg.module.display(),
            describe(&e)
        ))
    })?;
    let mut found = None;
    for slot in slots {
        let Ok(info) = module.get_token_info(slot) else {
            continue;
        };
        let l = info.label().trim_end().to_owned();
        let wanted = match &token {
            TokenSelector::Label(want) => *want == l,
            TokenSelector::Slot(s) => *s == slot.id(),
        };
        if wanted {
            found = Some((slot, l));
            break;
        }
    }
    let (slot, token_label) = found.ok_or_else(|| {
        ProviderError::Setup(match &token {
            TokenSelector::Label(l) => format!(
                "no token labelled {l:?} in PKCS#11 module {}",
                cfg.module.display()
            ),
            TokenSelector::Slot(s) => format!(
                "no token in slot {s} of PKCS#11 module {}",
                cfg.module.display()
            ),
        })
    })?;
    let setup = |e: Error| ProviderError::Setup(format!("token {token_label:?}: {}", describe(&e)));
    let session = module.open_rw_session(slot).map_err(setup)?;
    match session.login(UserType::User, Some(pin)) {
        Ok(()) | Err(Error::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {}
        Err(e) => return Err(setup(e)),
    }
    let existing = session
        .find_objects(&[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::Label(label.as_bytes().to_vec()),
        ])
        .map_err(setup)?;
    if !existing.is_empty() {
        return Err(ProviderError::Setup(format!(
            "token {token_label:?}: a secret key labelled {label:?} already exists"
        )));
    }
    let id = match id {
        Some(id) => id,
        None => {
            let mut id = vec![0u8; 8];
            fill_random(&mut id)?;
            id
        }
    };
    let template = [
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::ValueLen(Ulong::from(KEY_LEN as u64)),
        Attribute::Label(label.as_bytes().to_vec()),
        Attribute::Id(id.clone()),
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Encrypt(true),
        Attribute::Decrypt(true),
        Attribute::Wrap(false),
        Attribute::Unwrap(false),
        Attribute::Sign(false),
        Attribute::Verify(false),
        Attribute::Derive(false),
    ];
    session
        .generate_key(&Mechanism::AesKeyGen, &template)
        .map_err(setup)?;
    Ok(CreatedKey {
        token_label,
        label: label.to_owned(),
        id,
    })
}

#[cfg(test)]
mod tests {
    use cryptoki::context::Function;

    use super::*;

    fn parse(toml_text: &str) -> Pkcs11Config {
        toml::from_str(toml_text).unwrap()
    }

    const BASE: &str = r#"
module = "/usr/lib/softhsm/libsofthsm2.so"
token_label = "kms"
pin_file = "/etc/kms/pin"
key_label = "kek"
"#;

    #[test]
    fn defaults_are_four_sessions_and_auto_mechanism() {
        let c = parse(BASE);
        assert_eq!(c.sessions, DEFAULT_SESSIONS);
        assert_eq!(c.mechanism, MechanismChoice::Auto);
        assert_eq!(c.validate(), Ok(()));
        let c = parse(&format!(
            "{BASE}mechanism = \"aes-key-wrap-pad\"\nsessions = 16\n"
        ));
        assert_eq!(c.mechanism, MechanismChoice::AesKeyWrapPad);
        assert_eq!(c.sessions, 16);
    }

    #[test]
    fn unknown_keys_and_mechanisms_are_refused() {
        assert!(toml::from_str::<Pkcs11Config>(&format!("{BASE}pin = \"1234\"\n")).is_err());
        assert!(
            toml::from_str::<Pkcs11Config>(&format!("{BASE}mechanism = \"aes-cbc\"\n")).is_err()
        );
    }

    #[test]
    fn validation_names_the_bad_key() {
        let bad = |extra: &str, drop: &str| {
            let text: String = BASE
                .lines()
                .filter(|l| drop.is_empty() || !l.starts_with(drop))
                .map(|l| format!("{l}\n"))
                .collect();
            parse(&format!("{text}{extra}")).validate().unwrap_err().0
        };
        assert_eq!(bad("slot_id = 3\n", ""), "token_label");
        assert_eq!(bad("", "token_label"), "token_label");
        assert_eq!(bad("pin_env = \"PIN\"\n", ""), "pin_file");
        assert_eq!(bad("", "pin_file"), "pin_file");
        assert_eq!(bad("", "key_label"), "key_label");
        assert_eq!(bad("key_id = \"xyz\"\n", ""), "key_id");
        assert_eq!(bad("sessions = 0\n", ""), "sessions");
        assert_eq!(bad("sessions = 100000\n", ""), "sessions");
        let by_id = parse(&format!(
            "{}key_id = \"0a0b\"\n",
            BASE.replace("key_label = \"kek\"\n", "")
        ));
        assert_eq!(by_id.validate(), Ok(()));
        assert_eq!(by_id.key_id_bytes(), Ok(Some(vec![0x0a, 0x0b])));
    }

    #[test]
    fn lost_sessions_are_told_apart_from_failed_tags() {
        let e = |rv| Error::Pkcs11(rv, Function::Decrypt);
        for rv in [
            RvError::SessionHandleInvalid,
            RvError::SessionClosed,
            RvError::DeviceRemoved,
            RvError::UserNotLoggedIn,
            RvError::KeyHandleInvalid,
        ] {
            assert!(session::session_lost(&e(rv)), "{rv:?}");
            assert!(!authentication_failed(&e(rv)), "{rv:?}");
        }
        for rv in [RvError::GeneralError, RvError::EncryptedDataInvalid] {
            assert!(authentication_failed(&e(rv)), "{rv:?}");
            assert!(!session::session_lost(&e(rv)), "{rv:?}");
        }
    }

    #[test]
    fn errors_read_as_pkcs11_names() {
        assert_eq!(
            describe(&Error::Pkcs11(
                RvError::SessionHandleInvalid,
                Function::Encrypt
            )),
            "C_Encrypt: CKR_SESSION_HANDLE_INVALID"
        );
        assert_eq!(
            describe(&Error::Pkcs11(RvError::PinIncorrect, Function::Login)),
            "C_Login: CKR_PIN_INCORRECT"
        );
    }
}
