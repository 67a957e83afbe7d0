//! Applying one command to the state: reads the current state, decides, and writes into
//! the entry's WriteBatch. Deterministic: the same command on the same state gives the
//! same batch and result on every node.

use granary_format::model::{
    OriginRestrictions, PackageChange, PackageKey, PackageRecord, VersionRecord,
};
use rocksdb::WriteBatch;
use serde::Serialize;

use super::command::{ApplyError, Command, CommandResult, PackageTarget, ResourceKind};
use super::{StateView, keys};
use crate::store::{CF_STATE, Store, StoreError};

/// Applies `cmd`, the entry at `log_index`, into `batch`.
pub(crate) fn apply(
    store: &Store,
    batch: &mut WriteBatch,
    cmd: &Command,
    log_index: u64,
) -> Result<CommandResult, StoreError> {
    let mut tx = Tx {
        store,
        view: StateView::new(store.clone()),
        batch,
    };
    let outcome = match cmd {
        Command::PutTokenKey(k) => tx
            .put(&keys::token_key(&k.kid), k)
            .map(|_| CommandResult::Done),
        Command::PutPrincipal(p) => tx
            .put(&keys::access_key(&p.access_key_id), p)
            .map(|_| CommandResult::Done),
        Command::CreateDomain(d) => tx.create_domain(d),
        Command::DeleteDomain { name } => tx.delete_domain(name),
        Command::CreateRepository(r) => tx.create_repository(r),
        Command::UpdateRepository {
            domain,
            name,
            description,
            upstreams,
        } => tx.update_repository(domain, name, description.as_deref(), upstreams.as_deref()),
        Command::DeleteRepository { domain, name } => tx.delete_repository(domain, name),
        Command::PublishVersion {
            target,
            version,
            tags,
        } => tx.publish(target, version, tags, log_index),
        Command::ChangePackage {
            target,
            change,
            now_ms,
        } => tx.change(target, change, *now_ms, log_index),
        Command::AssociateExternalConnection {
            domain,
            repository,
            connection,
        } => tx.associate(domain, repository, connection),
        Command::DisassociateExternalConnection {
            domain,
            repository,
            connection,
        } => tx.disassociate(domain, repository, connection),
        Command::PutPackageOrigin {
            target,
            restrictions,
            now_ms,
        } => tx.put_origin(target, *restrictions, *now_ms, log_index),
        Command::RetainVersion { targets, version } => tx.retain(targets, version, log_index),
        // The state machine takes a batch apart (`raft::state_machine`); one inside
        // another is never proposed.
        Command::Batch(_) => Err(TxError::Refused(ApplyError::Invalid(
            "a batch of commands cannot be applied as one command".into(),
        ))),
    };
    match outcome {
        Ok(result) => Ok(result),
        Err(TxError::Refused(e)) => {
            // Nothing of a refused command may be written.
            batch.clear();
            Ok(CommandResult::Failed(e))
        }
        Err(TxError::Store(e)) => Err(e),
    }
}

enum TxError {
    Refused(ApplyError),
    Store(StoreError),
}

impl From<StoreError> for TxError {
    fn from(e: StoreError) -> Self {
        TxError::Store(e)
    }
}

impl From<ApplyError> for TxError {
    fn from(e: ApplyError) -> Self {
        TxError::Refused(e)
    }
}

type TxResult<T> = Result<T, TxError>;

struct Tx<'a> {
    store: &'a Store,
    view: StateView,
    batch: &'a mut WriteBatch,
}

fn not_found(kind: ResourceKind, id: impl Into<String>) -> TxError {
    TxError::Refused(ApplyError::NotFound {
        kind,
        id: id.into(),
    })
}

fn conflict(kind: ResourceKind, id: impl Into<String>, message: impl Into<String>) -> TxError {
    TxError::Refused(ApplyError::Conflict {
        kind,
        id: id.into(),
        message: message.into(),
    })
}

impl Tx<'_> {
    fn put<T: Serialize>(&mut self, key: &[u8], value: &T) -> TxResult<()> {
        let bytes = serde_json::to_vec(value).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        self.batch.put_cf(self.store.cf(CF_STATE), key, bytes);
        Ok(())
    }

    fn delete(&mut self, key: &[u8]) {
        self.batch.delete_cf(self.store.cf(CF_STATE), key);
    }

    fn delete_prefix(&mut self, prefix: &[u8]) {
        self.batch.delete_range_cf(
            self.store.cf(CF_STATE),
            prefix,
            keys::prefix_end(prefix).as_slice(),
        );
    }

    fn create_domain(&mut self, d: &super::model::DomainRecord) -> TxResult<CommandResult> {
        if self.view.domain(&d.name)?.is_some() {
            return Err(conflict(
                ResourceKind::Domain,
                &d.name,
                format!("domain {} already exists", d.name),
            ));
        }
        self.put(&keys::domain(&d.name), d)?;
        Ok(CommandResult::Domain(d.clone()))
    }

    fn delete_domain(&mut self, name: &str) -> TxResult<CommandResult> {
        let d = self
            .view
            .domain(name)?
            .ok_or_else(|| not_found(ResourceKind::Domain, name))?;
        if self.view.has_repositories(name)? {
            return Err(conflict(
                ResourceKind::Domain,
                name,
                format!("domain {name} still has repositories; delete them first"),
            ));
        }
        self.delete(&keys::domain(name));
        Ok(CommandResult::Domain(d))
    }

    fn check_upstreams(&self, domain: &str, repo: &str, upstreams: &[String]) -> TxResult<()> {
        for (i, u) in upstreams.iter().enumerate() {
            if u == repo {
                return Err(TxError::Refused(ApplyError::Invalid(format!(
                    "repository {repo} cannot be its own upstream"
                ))));
            }
            if upstreams[..i].contains(u) {
                return Err(TxError::Refused(ApplyError::Invalid(format!(
                    "upstream {u} is listed twice"
                ))));
            }
            if self.view.repository(domain, u)?.is_none() {
                return Err(not_found(ResourceKind::Repository, u));
            }
        }
        // Refuse cycles: no upstream may reach `repo` through its own upstreams.
        let mut stack: Vec<String> = upstreams.to_vec();
        let mut seen = std::collections::BTreeSet::new();
        while let Some(r) = stack.pop() {
            if r == repo {
                return Err(TxError::Refused(ApplyError::Invalid(format!(
                    "upstreams of {repo} would form a cycle"
                ))));
            }
            if !seen.insert(r.clone()) {
                continue;
            }
            if let Some(rec) = self.view.repository(domain, &r)? {
                stack.extend(rec.upstreams);
            }
        }
        Ok(())
    }

    fn create_repository(&mut self, r: &super::model::RepositoryRecord) -> TxResult<CommandResult> {
        if self.view.domain(&r.domain)?.is_none() {
            return Err(not_found(ResourceKind::Domain, &r.domain));
        }
        if self.view.repository(&r.domain, &r.name)?.is_some() {
            return Err(conflict(
                ResourceKind::Repository,
                &r.name,
                format!(
                    "repository {} already exists in domain {}",
                    r.name, r.domain
                ),
            ));
        }
        self.check_upstreams(&r.domain, &r.name, &r.upstreams)?;
        self.put(&keys::repository(&r.domain, &r.name), r)?;
        Ok(CommandResult::Repository(r.clone()))
    }

    fn update_repository(
        &mut self,
        domain: &str,
        name: &str,
        description: Option<&str>,
        upstreams: Option<&[String]>,
    ) -> TxResult<CommandResult> {
        let mut r = self
            .view
            .repository(domain, name)?
            .ok_or_else(|| not_found(ResourceKind::Repository, name))?;
        if let Some(d) = description {
            r.description = Some(d.to_owned());
        }
        if let Some(u) = upstreams {
            self.check_upstreams(domain, name, u)?;
            r.upstreams = u.to_vec();
        }
        self.put(&keys::repository(domain, name), &r)?;
        Ok(CommandResult::Repository(r))
    }

    fn delete_repository(&mut self, domain: &str, name: &str) -> TxResult<CommandResult> {
        let r = self
            .view
            .repository(domain, name)?
            .ok_or_else(|| not_found(ResourceKind::Repository, name))?;
        if let Some(down) = self
            .view
            .repositories(Some(domain))?
            .into_iter()
            .find(|o| o.upstreams.iter().any(|u| u == name))
        {
            return Err(conflict(
                ResourceKind::Repository,
                name,
                format!(
                    "repository {name} is an upstream of {}; remove it there first",
                    down.name
                ),
            ));
        }
        self.delete(&keys::repository(domain, name));
        self.delete_prefix(&keys::key(keys::PACKAGE, &[domain, name]));
        self.delete_prefix(&keys::key(keys::VERSION, &[domain, name]));
        Ok(CommandResult::Repository(r))
    }

    fn target_package(&self, t: &PackageTarget) -> TxResult<Option<PackageRecord>> {
        if self.view.repository(&t.domain, &t.repository)?.is_none() {
            return Err(not_found(ResourceKind::Repository, &t.repository));
        }
        Ok(self
            .view
            .package(&t.domain, &t.repository, &t.format, &t.package)?)
    }

    fn publish(
        &mut self,
        t: &PackageTarget,
        version: &VersionRecord,
        tags: &[String],
        log_index: u64,
    ) -> TxResult<CommandResult> {
        let existing = self.target_package(t)?;
        let vkey = keys::version(
            &t.domain,
            &t.repository,
            &t.format,
            &t.package,
            &version.version,
        );
        if let Some(stored) = self.view.get::<VersionRecord>("version", &vkey)? {
            // The same proposal committed twice (a forwarded write retried after its
            // answer was lost): same publish time, same bytes. Answer as the first did.
            let same = |a: &VersionRecord, b: &VersionRecord| {
                a.published_ms == b.published_ms
                    && a.assets.len() == b.assets.len()
                    && a.assets
                        .iter()
                        .zip(&b.assets)
                        .all(|(x, y)| x.name == y.name && x.hashes.sha256 == y.hashes.sha256)
            };
            if same(&stored, version) {
                return Ok(CommandResult::Done);
            }
            return Err(TxError::Refused(ApplyError::VersionExists {
                version: version.version.clone(),
            }));
        }
        let now = version.published_ms;
        let mut pkg = existing
            .unwrap_or_else(|| new_package(t, now, log_index, OriginRestrictions::PUBLISHED_FIRST));
        if pkg.origin.publish == granary_format::model::Allow::Block {
            return Err(conflict(
                ResourceKind::Package,
                display(&t.package),
                format!(
                    "publishing to package {} is blocked by its origin controls",
                    display(&t.package)
                ),
            ));
        }
        pkg.modified_ms = now;
        pkg.stamp = log_index;
        for tag in tags {
            pkg.tags.insert(tag.clone(), version.version.clone());
        }
        let mut v = version.clone();
        v.revision = revision(log_index);
        v.modified_ms = now;
        self.put(&vkey, &v)?;
        self.put(
            &keys::package(&t.domain, &t.repository, &t.format, &t.package),
            &pkg,
        )?;
        Ok(CommandResult::Done)
    }

    fn associate(&mut self, domain: &str, name: &str, connection: &str) -> TxResult<CommandResult> {
        let mut r = self
            .view
            .repository(domain, name)?
            .ok_or_else(|| not_found(ResourceKind::Repository, name))?;
        if let Some(existing) = r.external_connections.first() {
            let message = if existing == connection {
                format!("repository {name} already has external connection {connection}")
            } else {
                format!(
                    "repository {name} already has external connection {existing}; a repository \
                     can have only one"
                )
            };
            return Err(conflict(ResourceKind::Repository, name, message));
        }
        r.external_connections.push(connection.to_owned());
        self.put(&keys::repository(domain, name), &r)?;
        Ok(CommandResult::Repository(r))
    }

    fn disassociate(
        &mut self,
        domain: &str,
        name: &str,
        connection: &str,
    ) -> TxResult<CommandResult> {
        let mut r = self
            .view
            .repository(domain, name)?
            .ok_or_else(|| not_found(ResourceKind::Repository, name))?;
        if !r.external_connections.iter().any(|c| c == connection) {
            return Err(not_found(
                ResourceKind::Repository,
                format!("external connection {connection} of repository {name}"),
            ));
        }
        r.external_connections.retain(|c| c != connection);
        self.put(&keys::repository(domain, name), &r)?;
        Ok(CommandResult::Repository(r))
    }

    fn put_origin(
        &mut self,
        t: &PackageTarget,
        restrictions: OriginRestrictions,
        now_ms: i64,
        log_index: u64,
    ) -> TxResult<CommandResult> {
        let mut pkg = self
            .target_package(t)?
            .unwrap_or_else(|| new_package(t, now_ms, log_index, restrictions));
        pkg.origin = restrictions;
        pkg.stamp = log_index;
        self.put(
            &keys::package(&t.domain, &t.repository, &t.format, &t.package),
            &pkg,
        )?;
        Ok(CommandResult::Done)
    }

    fn retain(
        &mut self,
        targets: &[PackageTarget],
        version: &VersionRecord,
        log_index: u64,
    ) -> TxResult<CommandResult> {
        for t in targets {
            if self.view.repository(&t.domain, &t.repository)?.is_none() {
                continue;
            }
            let existing = self
                .view
                .package(&t.domain, &t.repository, &t.format, &t.package)?;
            if existing
                .as_ref()
                .is_some_and(|p| p.origin.upstream == granary_format::model::Allow::Block)
            {
                continue;
            }
            let vkey = keys::version(
                &t.domain,
                &t.repository,
                &t.format,
                &t.package,
                &version.version,
            );
            if self.view.get::<VersionRecord>("version", &vkey)?.is_some() {
                continue;
            }
            let now = version.modified_ms;
            let mut pkg = existing.unwrap_or_else(|| {
                new_package(t, now, log_index, OriginRestrictions::INGESTED_FIRST)
            });
            pkg.modified_ms = now;
            pkg.stamp = log_index;
            let mut v = version.clone();
            v.revision = revision(log_index);
            v.remote.clear();
            self.put(&vkey, &v)?;
            self.put(
                &keys::package(&t.domain, &t.repository, &t.format, &t.package),
                &pkg,
            )?;
        }
        Ok(CommandResult::Done)
    }

    fn change(
        &mut self,
        t: &PackageTarget,
        change: &PackageChange,
        now_ms: i64,
        log_index: u64,
    ) -> TxResult<CommandResult> {
        let mut pkg = self
            .target_package(t)?
            .ok_or_else(|| not_found(ResourceKind::Package, display(&t.package)))?;
        let vkey = |v: &str| keys::version(&t.domain, &t.repository, &t.format, &t.package, v);
        let find = |tx: &Self, v: &str| -> TxResult<VersionRecord> {
            tx.view
                .get::<VersionRecord>("version", &vkey(v))?
                .ok_or_else(|| {
                    not_found(
                        ResourceKind::PackageVersion,
                        format!("{}@{v}", display(&t.package)),
                    )
                })
        };
        let pkey = keys::package(&t.domain, &t.repository, &t.format, &t.package);
        match change {
            PackageChange::SetTag { tag, version } => {
                find(self, version)?;
                pkg.tags.insert(tag.clone(), version.clone());
            }
            PackageChange::RemoveTag { tag } => {
                if pkg.tags.remove(tag).is_none() {
                    return Err(not_found(ResourceKind::Package, format!("tag {tag}")));
                }
            }
            PackageChange::ReplaceMetadata { version, metadata } => {
                let mut v = find(self, version)?;
                v.metadata = metadata.clone();
                v.modified_ms = now_ms;
                v.revision = revision(log_index);
                self.put(&vkey(version), &v)?;
            }
            PackageChange::DeleteVersion { version } => {
                find(self, version)?;
                self.delete(&vkey(version));
                pkg.tags.retain(|_, v| v != version);
                let remaining = self
                    .view
                    .versions(&t.domain, &t.repository, &t.format, &t.package)?
                    .into_iter()
                    .filter(|v| &v.version != version)
                    .count();
                if remaining == 0 {
                    self.delete(&pkey);
                    return Ok(CommandResult::Done);
                }
            }
        }
        pkg.modified_ms = now_ms;
        pkg.stamp = log_index;
        self.put(&pkey, &pkg)?;
        Ok(CommandResult::Done)
    }
}

/// A package's record on its first arrival.
fn new_package(
    t: &PackageTarget,
    now_ms: i64,
    log_index: u64,
    origin: OriginRestrictions,
) -> PackageRecord {
    PackageRecord {
        key: t.package.clone(),
        created_ms: now_ms,
        modified_ms: now_ms,
        stamp: log_index,
        tags: Default::default(),
        origin,
    }
}

fn revision(log_index: u64) -> String {
    format!("R{log_index:012X}")
}

fn display(p: &PackageKey) -> String {
    match &p.namespace {
        Some(ns) => format!("{ns}/{}", p.name),
        None => p.name.clone(),
    }
}

#[cfg(test)]
mod tests {
    use granary_format::model::{VersionOrigin, VersionStatus, VersionSummary};

    use super::*;
    use crate::state::model::{DomainRecord, RepositoryRecord};

    struct Fixture {
        _dir: tempfile::TempDir,
        store: Store,
        index: u64,
    }

    impl Fixture {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let store = Store::open(dir.path()).unwrap();
            Fixture {
                _dir: dir,
                store,
                index: 0,
            }
        }

        fn run(&mut self, cmd: Command) -> CommandResult {
            self.index += 1;
            let mut batch = WriteBatch::default();
            let r = apply(&self.store, &mut batch, &cmd, self.index).unwrap();
            self.store.db().write(batch).unwrap();
            r
        }

        fn view(&self) -> StateView {
            StateView::new(self.store.clone())
        }
    }

    fn domain(name: &str) -> Command {
        Command::CreateDomain(DomainRecord {
            name: name.into(),
            owner: "000000000000".into(),
            created_ms: 1,
            encryption_key: "k".into(),
            tags: vec![],
        })
    }

    fn repo(name: &str, upstreams: &[&str]) -> Command {
        Command::CreateRepository(RepositoryRecord {
            domain: "d".into(),
            name: name.into(),
            administrator: "000000000000".into(),
            description: None,
            upstreams: upstreams.iter().map(|s| s.to_string()).collect(),
            external_connections: vec![],
            created_ms: 1,
            tags: vec![],
        })
    }

    fn target() -> PackageTarget {
        PackageTarget {
            domain: "d".into(),
            repository: "r".into(),
            format: "npm".into(),
            package: PackageKey::new(None, "p"),
        }
    }

    fn publish(version: &str) -> Command {
        publish_at(version, 5)
    }

    fn publish_at(version: &str, ms: i64) -> Command {
        Command::PublishVersion {
            target: target(),
            version: Box::new(VersionRecord {
                version: version.into(),
                revision: String::new(),
                status: VersionStatus::Published,
                published_ms: ms,
                modified_ms: ms,
                origin: VersionOrigin::default(),
                summary: VersionSummary::default(),
                metadata: serde_json::json!({"name": "p"}),
                assets: vec![],
                remote: vec![],
            }),
            tags: vec!["latest".into()],
        }
    }

    fn failed(r: CommandResult) -> ApplyError {
        match r {
            CommandResult::Failed(e) => e,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn publish_is_decided_in_apply() {
        let mut f = Fixture::new();
        f.run(domain("d"));
        f.run(repo("r", &[]));
        assert!(matches!(f.run(publish("1.0.0")), CommandResult::Done));
        let stamp1 = f
            .view()
            .package("d", "r", "npm", &target().package)
            .unwrap()
            .unwrap()
            .stamp;
        assert_eq!(
            failed(f.run(publish_at("1.0.0", 6))),
            ApplyError::VersionExists {
                version: "1.0.0".into()
            }
        );
        // The same proposal committed again (a retried forward) answers as the first.
        assert!(matches!(f.run(publish("1.0.0")), CommandResult::Done));
        assert!(matches!(f.run(publish("1.1.0")), CommandResult::Done));
        let pkg = f
            .view()
            .package("d", "r", "npm", &target().package)
            .unwrap()
            .unwrap();
        assert!(pkg.stamp > stamp1, "every change moves the stamp");
        assert_eq!(pkg.tags["latest"], "1.1.0");
        let v = f
            .view()
            .version("d", "r", "npm", &target().package, "1.0.0")
            .unwrap()
            .unwrap();
        assert!(!v.revision.is_empty());
        // Deleting every version deletes the package; the version may be published again.
        for v in ["1.0.0", "1.1.0"] {
            let r = f.run(Command::ChangePackage {
                target: target(),
                change: PackageChange::DeleteVersion { version: v.into() },
                now_ms: 9,
            });
            assert!(matches!(r, CommandResult::Done));
        }
        assert!(
            f.view()
                .package("d", "r", "npm", &target().package)
                .unwrap()
                .is_none()
        );
        assert!(matches!(f.run(publish("1.0.0")), CommandResult::Done));
    }

    #[test]
    fn refused_commands_change_nothing() {
        let mut f = Fixture::new();
        f.run(domain("d"));
        assert!(matches!(
            failed(f.run(domain("d"))),
            ApplyError::Conflict { .. }
        ));
        assert!(matches!(
            failed(f.run(publish("1.0.0"))),
            ApplyError::NotFound { .. }
        ));
        f.run(repo("a", &[]));
        f.run(repo("b", &["a"]));
        // a → b → a would be a cycle.
        let r = f.run(Command::UpdateRepository {
            domain: "d".into(),
            name: "a".into(),
            description: Some("changed".into()),
            upstreams: Some(vec!["b".into()]),
        });
        assert!(matches!(failed(r), ApplyError::Invalid(_)));
        let a = f.view().repository("d", "a").unwrap().unwrap();
        assert_eq!(a.description, None, "a refused update wrote nothing");
        assert!(matches!(
            failed(f.run(Command::DeleteRepository {
                domain: "d".into(),
                name: "a".into()
            })),
            ApplyError::Conflict { .. }
        ));
        assert!(matches!(
            failed(f.run(Command::DeleteDomain { name: "d".into() })),
            ApplyError::Conflict { .. }
        ));
        let r = f.run(Command::ChangePackage {
            target: PackageTarget {
                repository: "a".into(),
                ..target()
            },
            change: PackageChange::SetTag {
                tag: "x".into(),
                version: "1".into(),
            },
            now_ms: 1,
        });
        assert!(matches!(failed(r), ApplyError::NotFound { .. }));
    }

    #[test]
    fn deleting_a_repository_deletes_its_packages_only() {
        let mut f = Fixture::new();
        f.run(domain("d"));
        f.run(repo("r", &[]));
        f.run(repo("r2", &[]));
        f.run(publish("1.0.0"));
        f.run(Command::PublishVersion {
            target: PackageTarget {
                repository: "r2".into(),
                ..target()
            },
            version: match publish("2.0.0") {
                Command::PublishVersion { version, .. } => version,
                _ => unreachable!(),
            },
            tags: vec![],
        });
        assert!(matches!(
            f.run(Command::DeleteRepository {
                domain: "d".into(),
                name: "r".into()
            }),
            CommandResult::Repository(_)
        ));
        assert!(
            f.view()
                .package("d", "r", "npm", &target().package)
                .unwrap()
                .is_none()
        );
        assert!(
            f.view()
                .versions("d", "r", "npm", &target().package)
                .unwrap()
                .is_empty()
        );
        assert_eq!(
            f.view()
                .versions("d", "r2", "npm", &target().package)
                .unwrap()
                .len(),
            1
        );
    }

    fn retained(version: &str) -> VersionRecord {
        match publish(version) {
            Command::PublishVersion { version, .. } => *version,
            _ => unreachable!(),
        }
    }

    fn target_in(repo: &str) -> PackageTarget {
        PackageTarget {
            repository: repo.into(),
            ..target()
        }
    }

    #[test]
    fn retention_respects_origin_controls_and_never_fails() {
        let mut f = Fixture::new();
        f.run(domain("d"));
        f.run(repo("r", &[]));
        f.run(repo("store", &[]));
        f.run(repo("own", &[]));
        // `own` published p first: its origin controls block upstream versions.
        f.run(Command::PublishVersion {
            target: target_in("own"),
            version: Box::new(retained("0.1.0")),
            tags: vec![],
        });
        let retain = Command::RetainVersion {
            targets: vec![
                target_in("r"),
                target_in("store"),
                target_in("own"),
                target_in("gone"),
            ],
            version: Box::new(retained("1.0.0")),
        };
        assert!(matches!(f.run(retain.clone()), CommandResult::Done));
        let v = f.view();
        for kept in ["r", "store"] {
            let pkg = v
                .package("d", kept, "npm", &target().package)
                .unwrap()
                .unwrap();
            assert_eq!(pkg.origin, OriginRestrictions::INGESTED_FIRST, "{kept}");
            assert!(
                v.version("d", kept, "npm", &target().package, "1.0.0")
                    .unwrap()
                    .is_some()
            );
        }
        assert!(
            v.version("d", "own", "npm", &target().package, "1.0.0")
                .unwrap()
                .is_none()
        );
        // Again: nothing changes, nothing fails.
        assert!(matches!(f.run(retain), CommandResult::Done));
        // Ingested first: publishing to it is blocked until the controls change.
        let blocked = f.run(Command::PublishVersion {
            target: target_in("store"),
            version: Box::new(retained("2.0.0")),
            tags: vec![],
        });
        assert!(matches!(failed(blocked), ApplyError::Conflict { .. }));
        f.run(Command::PutPackageOrigin {
            target: target_in("store"),
            restrictions: OriginRestrictions::PUBLISHED_FIRST,
            now_ms: 9,
        });
        let pkg = f
            .view()
            .package("d", "store", "npm", &target().package)
            .unwrap()
            .unwrap();
        assert_eq!(pkg.origin, OriginRestrictions::PUBLISHED_FIRST);
    }

    #[test]
    fn one_external_connection_per_repository() {
        let mut f = Fixture::new();
        f.run(domain("d"));
        f.run(repo("r", &[]));
        let assoc = |c: &str| Command::AssociateExternalConnection {
            domain: "d".into(),
            repository: "r".into(),
            connection: c.into(),
        };
        assert!(matches!(
            f.run(assoc("public:npmjs")),
            CommandResult::Repository(_)
        ));
        assert!(matches!(
            failed(f.run(assoc("public:pypi"))),
            ApplyError::Conflict { .. }
        ));
        let dis = Command::DisassociateExternalConnection {
            domain: "d".into(),
            repository: "r".into(),
            connection: "public:npmjs".into(),
        };
        assert!(matches!(f.run(dis.clone()), CommandResult::Repository(_)));
        assert!(matches!(failed(f.run(dis)), ApplyError::NotFound { .. }));
        assert!(matches!(
            f.run(assoc("public:pypi")),
            CommandResult::Repository(_)
        ));
    }
}
