//! The three ways users install bpg-tunnel, each driven through its platform's own contract
//! (no Heroku, no Docker engine here): the classic buildpack's bin/detect + bin/compile and a
//! dyno booted from its output, the Cloud Native Buildpack's bin/build and exec.d run the way
//! the launcher runs them, and Dockerfile.example's ENTRYPOINT/CMD as PID 1 of a fresh PID
//! namespace. The binary installed is the release tarball (see `support::release_tarball`).
#![allow(
    clippy::disallowed_methods,
    reason = "a test reads its lab's settings from the environment"
)]

mod support;

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use support::{daemon_pid, field, psql_url, wait_gone, Tunnel};

const T: Duration = Duration::from_secs(30);

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `program` of the buildpack in `dir`, with a build machine's bare environment.
fn buildpack_in(dir: &Path, program: &str) -> Command {
    let mut command = Command::new(dir.join(program));
    command
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", std::env::temp_dir());
    command
}

/// `program` of the repository's buildpack (the git-tree one).
fn buildpack(program: &str) -> Command {
    buildpack_in(&repo().join("buildpack"), program)
}

fn file_url(path: &Path) -> String {
    format!("file://{}", path.display())
}

fn sha256_of(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    String::from_utf8(out.stdout).unwrap()[..64].to_owned()
}

fn tarball_sha256() -> String {
    sha256_of(&support::release_tarball())
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// The program failed and said `says`.
fn assert_refused(output: &Output, says: &str) {
    let out = text(output);
    assert!(!output.status.success(), "{out}");
    assert!(out.contains(says), "{out}");
}

fn is_executable(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// An artifact of `scripts/dist.sh` that `scripts/test.sh` names in `var`; outside CI, without
/// it, the test is skipped.
fn dist_artifact(var: &str) -> Option<PathBuf> {
    if let Some(path) = std::env::var_os(var) {
        return Some(PathBuf::from(path));
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("CI=true: set {var} to what scripts/dist.sh built");
    }
    eprintln!("SKIPPED: {var} (an artifact of scripts/dist.sh) is not set");
    None
}

/// A gzipped tarball unpacked in a new directory.
fn unpacked(archive: &Path) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let status = Command::new("tar")
        .arg("-xzf")
        .arg(archive)
        .arg("-C")
        .arg(dir.path())
        .status()
        .unwrap();
    assert!(status.success(), "tar -xzf {}", archive.display());
    dir
}

/// The self-contained buildpack .tgz, unpacked the way Heroku unpacks a buildpack URL.
fn unpacked_buildpack() -> Option<tempfile::TempDir> {
    Some(unpacked(&dist_artifact("BPG_TUNNEL_BUILDPACK")?))
}

/// `file`'s description of `path`.
fn file_type(path: &Path) -> String {
    let out = Command::new("file").arg("-b").arg(path).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A release's downloads laid out as `{base}/v{version}/bpg-tunnel-{version}-{target}.tar.gz`
/// (the pin's and Dockerfile.example's scheme), holding the x86_64 tarball under test.
fn local_releases(version: &str) -> tempfile::TempDir {
    let releases = tempfile::tempdir().unwrap();
    let release = releases.path().join(format!("v{version}"));
    std::fs::create_dir(&release).unwrap();
    std::fs::copy(
        support::release_tarball(),
        release.join(format!(
            "bpg-tunnel-{version}-x86_64-unknown-linux-musl.tar.gz"
        )),
    )
    .unwrap();
    releases
}

/// Runs classic bin/compile; the binary URL comes from the environment.
fn compile(build: &Path, cache: &Path, env_dir: &Path, url: Option<&str>) -> Output {
    let mut compile = buildpack("bin/compile");
    compile.args([build, cache, env_dir]);
    if let Some(url) = url {
        compile.env("BPG_TUNNEL_BINARY_URL", url);
    }
    compile.output().unwrap()
}

/// The add-on's config vars for a dyno, with a private state dir so parallel tests never meet.
fn dyno_vars(lab: &support::Lab, state: &Path) -> BTreeMap<String, String> {
    let db = lab.attachment("DATABASE");
    let mut vars = db.vars.clone();
    vars.insert("BPG_TUNNEL_STATE_DIR".into(), state.display().to_string());
    vars.insert("BPG_TUNNEL_LOG".into(), "info".into());
    vars.insert("APP_URL".into(), psql_url(&db.vars["DATABASE_URL"]));
    vars
}

#[test]
fn classic_compile_installs_the_binary_reuses_its_cache_and_refuses_a_bad_checksum() {
    let build = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    let env_dir = tempfile::tempdir().unwrap();
    let url = file_url(&support::release_tarball());

    let detect = buildpack("bin/detect").arg(build.path()).output().unwrap();
    assert!(detect.status.success());
    assert!(String::from_utf8_lossy(&detect.stdout).contains("bpg-tunnel"));

    let first = compile(build.path(), cache.path(), env_dir.path(), Some(&url));
    let out = text(&first);
    assert!(first.status.success(), "{out}");
    assert!(out.contains("-----> Downloading bpg-tunnel"), "{out}");
    assert!(out.contains(&tarball_sha256()), "{out}");
    let binary = build.path().join(".borealis-pg/bin/bpg-tunnel");
    assert!(is_executable(&binary));
    let version = Command::new(&binary).arg("--version").output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&version.stdout).trim(),
        format!("bpg-tunnel {}", env!("CARGO_PKG_VERSION"))
    );
    let profile = build
        .path()
        .join(".profile.d/borealis-pg-init-secure-tunnel.sh");
    assert_eq!(
        std::fs::read(&profile).unwrap(),
        std::fs::read(repo().join("buildpack/profile.d/borealis-pg-init-secure-tunnel.sh"))
            .unwrap()
    );

    // A second build: the URL as a config var (ENV_DIR), the download from the cache.
    let build2 = tempfile::tempdir().unwrap();
    std::fs::write(env_dir.path().join("BPG_TUNNEL_BINARY_URL"), &url).unwrap();
    let second = compile(build2.path(), cache.path(), env_dir.path(), None);
    let out = text(&second);
    assert!(second.status.success(), "{out}");
    assert!(out.contains("-----> Using cached bpg-tunnel"), "{out}");
    assert!(!out.contains("Downloading"), "{out}");
    assert!(is_executable(
        &build2.path().join(".borealis-pg/bin/bpg-tunnel")
    ));

    // A checksum that does not match: the build fails, says so, and installs nothing.
    let build3 = tempfile::tempdir().unwrap();
    let cache3 = tempfile::tempdir().unwrap();
    let wrong = "0".repeat(64);
    let bad = buildpack("bin/compile")
        .args([build3.path(), cache3.path(), env_dir.path()])
        .env("BPG_TUNNEL_BINARY_SHA256", &wrong)
        .output()
        .unwrap();
    let out = text(&bad);
    assert!(!bad.status.success(), "{out}");
    assert!(out.contains(" !     Checksum mismatch"), "{out}");
    assert!(out.contains(&format!("expected SHA-256 {wrong}")), "{out}");
    assert!(
        out.contains(&format!("got SHA-256 {}", tarball_sha256())),
        "{out}"
    );
    assert!(!build3.path().join(".borealis-pg/bin/bpg-tunnel").exists());
}

/// bin/compile downloaded the pinned `version` and installed it in `build`.
fn assert_installed_the_pinned_release(compiled: &Output, build: &Path, version: &str) {
    let out = text(compiled);
    assert!(compiled.status.success(), "{out}");
    assert!(
        out.contains(&format!(
            "-----> Downloading bpg-tunnel {version} (x86_64-unknown-linux-musl)"
        )),
        "{out}"
    );
    assert!(is_executable(&build.join(".borealis-pg/bin/bpg-tunnel")));
}

#[test]
fn classic_compile_without_an_override_installs_the_pinned_release_only() {
    // The git-tree buildpack, with its pin's base pointed at a local copy of a release's
    // downloads: no network here.
    let copy = tempfile::tempdir().unwrap();
    let status = Command::new("cp")
        .arg("-R")
        .arg(repo().join("buildpack"))
        .arg(copy.path())
        .status()
        .unwrap();
    assert!(status.success());
    let pin_path = copy.path().join("buildpack/bpg-tunnel.pin");
    let pin = std::fs::read_to_string(&pin_path).unwrap();
    let version = pin
        .lines()
        .find_map(|l| l.strip_prefix("version="))
        .unwrap()
        .to_owned();
    let releases = local_releases(&version);
    let pin_to = |base: &str, sha: &str| {
        let text: String = pin
            .lines()
            .map(|line| match line.split_once('=') {
                Some(("base", _)) => format!("base={base}\n"),
                Some(("sha256.x86_64-unknown-linux-musl", _)) => {
                    format!("sha256.x86_64-unknown-linux-musl={sha}\n")
                }
                _ => format!("{line}\n"),
            })
            .collect();
        std::fs::write(&pin_path, text).unwrap();
    };
    let compile = |build: &Path| {
        let cache = tempfile::tempdir().unwrap();
        let env_dir = tempfile::tempdir().unwrap();
        buildpack_in(&copy.path().join("buildpack"), "bin/compile")
            .args([build, cache.path(), env_dir.path()])
            .output()
            .unwrap()
    };

    // As committed before any release is published: no base, so a clear refusal.
    pin_to("", "");
    let build = tempfile::tempdir().unwrap();
    let unpinned = compile(build.path());
    let out = text(&unpinned);
    assert!(!unpinned.status.success(), "{out}");
    assert!(
        out.contains(&format!(
            "pins no published bpg-tunnel {version} release for x86_64-unknown-linux-musl"
        )) && out.contains("BPG_TUNNEL_BINARY_URL"),
        "{out}"
    );

    pin_to(&file_url(releases.path()), &tarball_sha256());
    let build = tempfile::tempdir().unwrap();
    assert_installed_the_pinned_release(&compile(build.path()), build.path(), &version);

    // The pin is the only trust anchor: a tarball that differs from it is refused.
    pin_to(&file_url(releases.path()), &"f".repeat(64));
    let build = tempfile::tempdir().unwrap();
    let refused = compile(build.path());
    assert_refused(&refused, "Checksum mismatch");
    assert!(!build.path().join(".borealis-pg/bin/bpg-tunnel").exists());
}

/// Boots a dyno from a compiled BUILD_DIR the way Heroku does: HOME is the build dir, a login
/// bash sources `.profile.d/*.sh`, then execs the app's command.
fn boot_dyno(build: &Path, vars: &BTreeMap<String, String>, app: &str) -> Tunnel {
    let app_script = build.join("app.sh");
    std::fs::write(&app_script, app).unwrap();
    let mut vars = vars.clone();
    vars.insert("HOME".into(), build.display().to_string());
    let mut bash = Command::new("bash");
    bash.current_dir(build).args([
        "-l",
        "-c",
        r#"for f in "$HOME"/.profile.d/*.sh; do . "$f"; done; exec bash ./app.sh"#,
    ]);
    Tunnel::command(bash, vars.iter())
}

/// Boots a dyno from the compiled `build` whose app runs one query at once: it must succeed.
fn assert_first_query(lab: &support::Lab, build: &Path) {
    let state = tempfile::tempdir().unwrap();
    let vars = dyno_vars(lab, state.path());
    let mut dyno = boot_dyno(
        build,
        &vars,
        r#"psql "$APP_URL" -XAtc "select 'first-query-ok'"
"#,
    );
    let status = dyno.wait_exit(T).expect("the app runs its query and exits");
    let out = dyno.lines().join("\n");
    assert!(status.success(), "{out}");
    assert!(out.contains("first-query-ok"), "{out}");
}

fn compiled_build_dir() -> tempfile::TempDir {
    let build = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    let env_dir = tempfile::tempdir().unwrap();
    let url = file_url(&support::release_tarball());
    let compiled = compile(build.path(), cache.path(), env_dir.path(), Some(&url));
    assert!(compiled.status.success(), "{}", text(&compiled));
    build
}

/// `git ARGS` in `dir`, which must succeed; its stdout.
fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .current_dir(dir)
        .args(args)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("HOME", dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "git {args:?}: {}", text(&out));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// A copy of this repository's release tooling (buildpack/, scripts/, Dockerfile.example) as
/// a git repository with one commit, `main` as committed.
fn release_repository() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for path in ["buildpack", "scripts", "Dockerfile.example"] {
        let status = Command::new("cp")
            .arg("-R")
            .arg(repo().join(path))
            .arg(dir.path())
            .status()
            .unwrap();
        assert!(status.success(), "{path}");
    }
    let _ = std::fs::remove_dir_all(dir.path().join("buildpack/vendor"));
    git(dir.path(), &["init", "-q", "-b", "main"]);
    git(dir.path(), &["config", "user.name", "Release Bot"]);
    git(dir.path(), &["config", "user.email", "release@example.com"]);
    git(dir.path(), &["add", "-A"]);
    git(dir.path(), &["commit", "-q", "-m", "main as committed"]);
    dir
}

/// What the release workflow's pin job does for `version`, whose downloads are under
/// `releases`: scripts/pin.sh with the release's checksums (the x86_64 tarball under test; a
/// stand-in for aarch64), the pin committed.
fn pin_release(repo: &Path, version: &str, releases: &Path) {
    let released = tempfile::tempdir().unwrap();
    for (target, sha) in [
        ("x86_64-unknown-linux-musl", tarball_sha256()),
        ("aarch64-unknown-linux-musl", "a".repeat(64)),
    ] {
        std::fs::write(
            released
                .path()
                .join(format!("bpg-tunnel-{version}-{target}.tar.gz.sha256")),
            format!("{sha}  bpg-tunnel-{version}-{target}.tar.gz\n"),
        )
        .unwrap();
    }
    let pinned = Command::new(repo.join("scripts/pin.sh"))
        .arg(version)
        .arg(released.path())
        .arg(file_url(releases))
        .output()
        .unwrap();
    assert!(pinned.status.success(), "{}", text(&pinned));
    git(repo, &["commit", "-q", "-am", &format!("Pin {version}")]);
}

/// scripts/buildpack-ref.sh in `repo`, from the released commit `from`.
fn make_buildpack_ref(repo: &Path, from: &str) -> Output {
    Command::new(repo.join("scripts/buildpack-ref.sh"))
        .args(["--from", from])
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("HOME", repo)
        .output()
        .unwrap()
}

/// A shallow clone of `repo` at `reference`, as Heroku fetches a buildpack from a registry
/// version or a git URL.
fn clone_at(repo: &Path, reference: &str) -> tempfile::TempDir {
    let clone = tempfile::tempdir().unwrap();
    let out = Command::new("git")
        .args(["clone", "-q", "--depth", "1", "--branch", reference])
        .arg(format!("file://{}", repo.display()))
        .arg(clone.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    clone
}

#[test]
fn the_buildpack_ref_installs_from_a_clone_as_the_registry_and_git_urls_do() {
    let Some(lab) = support::lab() else { return };
    let origin = release_repository();
    let repo_copy = origin.path();
    let version = env!("CARGO_PKG_VERSION");
    let tag = format!("buildpack-v{version}");
    let released = git(repo_copy, &["rev-parse", "HEAD"]);

    // Before a release is pinned, there is nothing such an install could download: refused.
    let unpinned = make_buildpack_ref(repo_copy, "HEAD");
    assert_refused(&unpinned, "names no published release");

    // The release's pin lands on main after a change to the buildpack that is not released:
    // the ref holds the released buildpack, with the pin.
    let detect = repo_copy.join("buildpack/bin/detect");
    let unreleased = std::fs::read_to_string(&detect)
        .unwrap()
        .replace("echo \"", "echo \"unreleased ");
    std::fs::write(&detect, unreleased).unwrap();
    git(
        repo_copy,
        &["commit", "-q", "-am", "A change after the release"],
    );
    let releases = local_releases(version);
    pin_release(repo_copy, version, releases.path());
    let made = make_buildpack_ref(repo_copy, &released);
    assert!(made.status.success(), "{}", text(&made));
    let commit = String::from_utf8_lossy(&made.stdout).trim().to_owned();
    assert_eq!(
        git(repo_copy, &["rev-parse", &format!("{tag}^{{commit}}")]),
        commit
    );
    assert_eq!(git(repo_copy, &["rev-parse", "buildpack"]), commit);
    // Made again, nothing changes.
    let again = make_buildpack_ref(repo_copy, &released);
    assert_eq!(String::from_utf8_lossy(&again.stdout).trim(), commit);

    for reference in [tag.as_str(), "buildpack"] {
        // Programs at the root of the tree, and nothing of the repository around them.
        let clones = clone_at(repo_copy, reference);
        let clone = clones.path();
        let mut root: Vec<String> = std::fs::read_dir(clone)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|name| name != ".git")
            .collect();
        root.sort();
        assert_eq!(
            root,
            [
                "bin",
                "bpg-tunnel.pin",
                "buildpack.toml",
                "lib",
                "package.toml",
                "profile.d"
            ],
            "{reference}"
        );
        let build = tempfile::tempdir().unwrap();
        let detect = buildpack_in(clone, "bin/detect")
            .arg(build.path())
            .output()
            .unwrap();
        assert!(detect.status.success(), "{}", text(&detect));
        assert!(!text(&detect).contains("unreleased"), "{}", text(&detect));

        // With the binary named by BPG_TUNNEL_BINARY_URL (a local file: no network)...
        let cache = tempfile::tempdir().unwrap();
        let env_dir = tempfile::tempdir().unwrap();
        let compiled = buildpack_in(clone, "bin/compile")
            .args([build.path(), cache.path(), env_dir.path()])
            .env(
                "BPG_TUNNEL_BINARY_URL",
                file_url(&support::release_tarball()),
            )
            .output()
            .unwrap();
        assert!(compiled.status.success(), "{}", text(&compiled));
        // ...and the dyno booted from it gets its first query.
        assert_first_query(&lab, build.path());

        // Without the URL, as a registry install runs: the pinned release, downloaded and
        // checked against the pin.
        let build = tempfile::tempdir().unwrap();
        let cache = tempfile::tempdir().unwrap();
        let compiled = buildpack_in(clone, "bin/compile")
            .args([build.path(), cache.path(), env_dir.path()])
            .output()
            .unwrap();
        assert_installed_the_pinned_release(&compiled, build.path(), version);
    }

    // The next release: its own tag, on top of the first; the branch follows it, and the first
    // tag still installs the first release.
    let next = "99.0.0";
    let toml = repo_copy.join("buildpack/buildpack.toml");
    let bumped = std::fs::read_to_string(&toml).unwrap().replace(
        &format!("version = \"{version}\""),
        &format!("version = \"{next}\""),
    );
    std::fs::write(&toml, bumped).unwrap();
    git(
        repo_copy,
        &["commit", "-q", "-am", &format!("Version {next}")],
    );
    let next_released = git(repo_copy, &["rev-parse", "HEAD"]);
    let next_releases = local_releases(next);
    pin_release(repo_copy, next, next_releases.path());
    let made = make_buildpack_ref(repo_copy, &next_released);
    assert!(made.status.success(), "{}", text(&made));
    let next_commit = String::from_utf8_lossy(&made.stdout).trim().to_owned();
    assert_eq!(git(repo_copy, &["rev-parse", "buildpack"]), next_commit);
    assert_eq!(
        git(repo_copy, &["rev-parse", &format!("{next_commit}^")]),
        commit
    );
    assert_eq!(git(repo_copy, &["rev-parse", &tag]), commit);
    let first = clone_at(repo_copy, &tag);
    let pin = std::fs::read_to_string(first.path().join("bpg-tunnel.pin")).unwrap();
    assert!(pin.contains(&format!("\nversion={version}\n")), "{pin}");
    let newest = clone_at(repo_copy, "buildpack");
    let pin = std::fs::read_to_string(newest.path().join("bpg-tunnel.pin")).unwrap();
    assert!(pin.contains(&format!("\nversion={next}\n")), "{pin}");

    // A published version is never changed: a tag for other content is refused.
    std::fs::write(
        repo_copy.join("buildpack/bin/detect"),
        "#!/bin/sh\nexit 0\n",
    )
    .unwrap();
    git(repo_copy, &["commit", "-q", "-am", "Change the buildpack"]);
    let moved = make_buildpack_ref(repo_copy, "HEAD");
    assert_refused(&moved, "a published version is never changed");
    assert_eq!(git(repo_copy, &["rev-parse", "buildpack"]), next_commit);
}

#[test]
fn classic_dyno_first_query_succeeds_and_sigterm_drains_with_the_app() {
    let Some(lab) = support::lab() else { return };
    let build = compiled_build_dir();
    let state = tempfile::tempdir().unwrap();
    let vars = dyno_vars(&lab, state.path());
    let mut dyno = boot_dyno(
        build.path(),
        &vars,
        r#"trap '' TERM
psql "$APP_URL" -XAtc "select 'first-query-ok'"
echo app-booted
psql "$APP_URL" -XAtc "select 'in-flight-ok', pg_sleep(3)" &
sleep 2
psql "$APP_URL" -XAtc "select 'new-after-sigterm-ok'"
wait
echo app-exiting
"#,
    );
    dyno.wait_for(&["app-booted"], T);
    let daemon = daemon_pid(state.path()).expect("the profile.d script started the daemon");
    assert_eq!(
        std::fs::read_link(format!("/proc/{daemon}/exe")).unwrap(),
        build.path().join(".borealis-pg/bin/bpg-tunnel"),
        "the daemon is the binary bin/compile installed"
    );
    std::thread::sleep(Duration::from_millis(500));
    // Heroku's shutdown: SIGTERM to every process of the dyno, the daemon more than once.
    support::signal(-dyno.pid(), libc::SIGTERM);
    support::signal(daemon, libc::SIGTERM);
    support::signal(daemon, libc::SIGTERM);
    let status = dyno.wait_exit(T).expect("the app drains and exits");
    let out = dyno.lines().join("\n");
    assert!(status.success(), "{out}");
    for expected in ["first-query-ok", "in-flight-ok", "new-after-sigterm-ok"] {
        assert!(out.contains(expected), "{expected} missing:\n{out}");
    }
    assert!(
        wait_gone(daemon, Duration::from_secs(8)).is_some(),
        "daemon follows the app"
    );
}

#[test]
fn self_contained_buildpack_installs_with_no_network_and_its_dyno_gets_a_first_query() {
    let Some(lab) = support::lab() else { return };
    let Some(bp) = unpacked_buildpack() else {
        return;
    };
    if !support::can_unshare_pid() {
        return;
    }
    // Heroku runs bin/ at the archive's root; the binaries ride along, one per architecture.
    for program in ["bin/detect", "bin/compile", "bin/build"] {
        assert!(is_executable(&bp.path().join(program)), "{program}");
    }
    let version = env!("CARGO_PKG_VERSION");
    for target in ["x86_64-unknown-linux-musl", "aarch64-unknown-linux-musl"] {
        let vendored = bp
            .path()
            .join(format!("vendor/bpg-tunnel-{version}-{target}.tar.gz"));
        assert!(vendored.is_file(), "{}", vendored.display());
    }

    // bin/compile in a network namespace of its own: no interface up, no DNS, no proxy.
    let build = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    let env_dir = tempfile::tempdir().unwrap();
    let compiled = Command::new("unshare")
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .args(["--net", "bash", "-c"])
        .arg(
            r#"curl -sS --max-time 5 -o /dev/null https://crates.io 2>/dev/null && echo network-up || echo network-down
exec "$0" "$@""#,
        )
        .arg(bp.path().join("bin/compile"))
        .args([build.path(), cache.path(), env_dir.path()])
        .output()
        .unwrap();
    let out = text(&compiled);
    assert!(compiled.status.success(), "{out}");
    assert!(out.starts_with("network-down\n"), "{out}");
    assert!(
        out.contains(&format!(
            "-----> Installing bpg-tunnel {version} (x86_64-unknown-linux-musl) from this buildpack"
        )),
        "{out}"
    );
    assert!(!out.contains("Downloading"), "{out}");
    eprintln!("{out}");
    assert_first_query(&lab, build.path());
}

#[test]
fn profile_d_script_is_safe_to_source_and_starts_only_when_it_should() {
    let Some(lab) = support::lab() else { return };
    let build = compiled_build_dir();
    // The shell's options and traps before and after sourcing, and whether it carried on.
    let probe = r#"set -euo pipefail; trap 'echo usr1' USR1
before="$- $(trap -p)"
. "$HOME/.profile.d/borealis-pg-init-secure-tunnel.sh"
after="$- $(trap -p)"
[ "$before" = "$after" ] && echo same-shell-state || echo "changed: $before -> $after"
command -v bpg-tunnel >/dev/null && echo on-path
echo continued"#;
    let run = |vars: &BTreeMap<String, String>| {
        let mut vars = vars.clone();
        vars.insert("HOME".into(), build.path().display().to_string());
        let mut bash = Command::new("bash");
        bash.args(["-l", "-c", probe]);
        let mut shell = Tunnel::command(bash, vars.iter());
        let status = shell.wait_exit(T).expect("the shell finishes");
        (status, shell)
    };

    let state = tempfile::tempdir().unwrap();
    let configured = dyno_vars(&lab, state.path());
    let (status, shell) = run(&configured);
    let lines = shell.lines();
    assert!(status.success(), "{lines:#?}");
    for expected in ["same-shell-state", "on-path", "continued"] {
        assert!(lines.iter().any(|l| l == expected), "{lines:#?}");
    }
    assert!(
        lines.iter().any(|l| l.contains("event=ready")),
        "{lines:#?}"
    );
    // The daemon writes to the shell's output, and leaves after it.
    shell.wait_for(&["event=stopped"], T);

    let skipped = |extra: &[(&str, &str)], why: &str| {
        let state = tempfile::tempdir().unwrap();
        let mut vars = dyno_vars(&lab, state.path());
        for (key, value) in extra {
            vars.insert((*key).into(), (*value).into());
        }
        if extra.is_empty() {
            vars.retain(|key, _| !key.ends_with("_TUNNEL_BPG_CONN_INFO"));
        }
        let (status, shell) = run(&vars);
        let lines = shell.lines();
        assert!(status.success(), "{why}: {lines:#?}");
        assert!(lines.iter().any(|l| l == "continued"), "{why}: {lines:#?}");
        assert!(
            lines.iter().all(|l| !l.contains("source=bpg-tunnel")),
            "{why}: nothing is started or said: {lines:#?}"
        );
        assert!(daemon_pid(state.path()).is_none(), "{why}");
    };
    skipped(&[], "no add-on config");
    skipped(&[("SSH_CLIENT", "10.1.2.3 50000 22")], "heroku ps:exec");
    skipped(&[("BPG_TUNNEL_DISABLE", "1")], "disabled");

    // A broken config is reported, and the app still boots.
    let state = tempfile::tempdir().unwrap();
    let mut broken = dyno_vars(&lab, state.path());
    broken.insert("DATABASE_TUNNEL_BPG_CONN_INFO".into(), "SSH_HOST:=".into());
    let (status, shell) = run(&broken);
    let lines = shell.lines();
    assert!(status.success(), "{lines:#?}");
    assert!(lines.iter().any(|l| l == "continued"), "{lines:#?}");
    assert!(lines.iter().any(|l| l.contains("event=config-error")));
}

#[test]
fn profile_d_decides_on_names_alone_and_moves_no_secret_through_the_shell() {
    let Some(lab) = support::lab() else { return };
    let strace = support::which("strace").expect("strace (scripts/setup.sh installs it)");
    let build = compiled_build_dir();
    let state = tempfile::tempdir().unwrap();
    let mut vars = dyno_vars(&lab, state.path());
    vars.insert("HOME".into(), build.path().display().to_string());
    // The dyno's login shell sources the script with tracing on (`bash -x`), and every read and
    // write of it and of whatever it starts (the daemon included) is recorded whole.
    let recorded = tempfile::tempdir().unwrap();
    let syscalls = recorded.path().join("strace.txt");
    let mut command = Command::new(strace);
    command
        .args([
            "-f",
            "-qq",
            "-s",
            "1000000",
            "-e",
            "trace=read,write,pread64,pwrite64",
        ])
        .arg("-o")
        .arg(&syscalls)
        .args(["bash", "-x", "-l", "-c"])
        .arg(r#". "$HOME/.profile.d/borealis-pg-init-secure-tunnel.sh"; echo sourced"#);
    let mut shell = Tunnel::command(command, vars.iter());
    shell.wait_for(&["event=ready"], T);
    let status = shell.wait_exit(T).expect("the shell finishes");
    let lines = shell.lines();
    let out = lines.join("\n");
    assert!(status.success(), "{out}");
    assert!(lines.iter().any(|l| l == "sourced"), "{out}");
    // The trace is the script's, and shows the start it decided on.
    assert!(out.contains("bpg-tunnel start --owner-pid"), "{out}");
    let traced = std::fs::read_to_string(&syscalls).unwrap();
    assert!(
        traced.contains("write("),
        "strace recorded nothing: {traced}"
    );
    for secret in lab.secrets() {
        assert!(
            !out.contains(&secret),
            "a secret in the shell's trace:\n{out}"
        );
        let moved: Vec<&str> = traced.lines().filter(|l| l.contains(&secret)).collect();
        assert!(
            moved.is_empty(),
            "a secret was read or written by the shell or what it started:\n{}",
            moved.join("\n")
        );
    }
}

#[test]
fn cnb_package_builds_the_layer_for_the_images_architecture_whose_exec_d_is_the_binary() {
    let Some(lab) = support::lab() else { return };
    // What `pack buildpack package` packs: the self-contained buildpack, with its package.toml.
    let Some(bp) = unpacked_buildpack() else {
        return;
    };
    let package = std::fs::read_to_string(bp.path().join("package.toml")).unwrap();
    assert!(package.contains("uri = \".\""), "{package}");
    let descriptor = std::fs::read_to_string(bp.path().join("buildpack.toml")).unwrap();
    for arch in ["amd64", "arm64"] {
        assert!(
            descriptor.contains(&format!("[[targets]]\nos = \"linux\"\narch = \"{arch}\"")),
            "{descriptor}"
        );
    }
    let platform = tempfile::tempdir().unwrap();
    let plan = tempfile::tempdir().unwrap();
    std::fs::create_dir(platform.path().join("env")).unwrap();
    let cnb = |program: &str| {
        let mut command = buildpack_in(bp.path(), program);
        command
            .env("CNB_PLATFORM_DIR", platform.path())
            .env("CNB_BUILDPACK_DIR", bp.path());
        command
    };

    let detect = cnb("bin/detect")
        .env("CNB_BUILD_PLAN_PATH", plan.path().join("plan.toml"))
        .output()
        .unwrap();
    assert!(detect.status.success(), "{}", text(&detect));

    let build = |layers: &Path, arch: &str| {
        let output = cnb("bin/build")
            .env("CNB_LAYERS_DIR", layers)
            .env("CNB_BP_PLAN_PATH", plan.path().join("plan.toml"))
            .env("CNB_TARGET_ARCH", arch)
            .output()
            .unwrap();
        assert!(output.status.success(), "{}", text(&output));
        text(&output)
    };
    let version = env!("CARGO_PKG_VERSION");

    // An arm64 image, built on this x86_64 machine: the arm64 binary, installed but not run.
    let arm_layers = tempfile::tempdir().unwrap();
    let out = build(arm_layers.path(), "arm64");
    assert!(
        out.contains(&format!(
            "-----> Installing bpg-tunnel {version} (aarch64-unknown-linux-musl) from this buildpack"
        )),
        "{out}"
    );
    let arm_binary = arm_layers.path().join("bpg-tunnel/bin/bpg-tunnel");
    assert!(
        file_type(&arm_binary).contains("ARM aarch64"),
        "{}",
        file_type(&arm_binary)
    );
    let toml = std::fs::read_to_string(arm_layers.path().join("bpg-tunnel.toml")).unwrap();
    assert!(
        toml.contains("target = \"aarch64-unknown-linux-musl\""),
        "{toml}"
    );

    // A binary of the wrong architecture would keep every process from starting: refused.
    let arm_tarball = bp.path().join(format!(
        "vendor/bpg-tunnel-{version}-aarch64-unknown-linux-musl.tar.gz"
    ));
    let wrong_layers = tempfile::tempdir().unwrap();
    let wrong = cnb("bin/build")
        .env("CNB_LAYERS_DIR", wrong_layers.path())
        .env("CNB_BP_PLAN_PATH", plan.path().join("plan.toml"))
        .env("CNB_TARGET_ARCH", "amd64")
        .env("BPG_TUNNEL_BINARY_URL", file_url(&arm_tarball))
        .env("BPG_TUNNEL_BINARY_SHA256", sha256_of(&arm_tarball))
        .output()
        .unwrap();
    assert_refused(
        &wrong,
        "is for aarch64, but this build is for x86_64-unknown-linux-musl",
    );
    assert!(!wrong_layers
        .path()
        .join("bpg-tunnel/bin/bpg-tunnel")
        .exists());

    let layers = tempfile::tempdir().unwrap();
    assert!(build(layers.path(), "amd64").contains("-----> Installing bpg-tunnel"));
    assert!(build(layers.path(), "amd64").contains("-----> Using cached bpg-tunnel"));

    let layer = layers.path().join("bpg-tunnel");
    let toml = std::fs::read_to_string(layers.path().join("bpg-tunnel.toml")).unwrap();
    assert!(toml.contains("[types]\nlaunch = true\n"), "{toml}");
    assert!(
        toml.contains("target = \"x86_64-unknown-linux-musl\""),
        "{toml}"
    );
    assert!(
        !toml.contains("cache = true"),
        "the app image layer is not a cache"
    );
    let cache_toml = std::fs::read_to_string(layers.path().join("bpg-tunnel-cache.toml")).unwrap();
    assert!(cache_toml.contains("cache = true") && !cache_toml.contains("launch = true"));
    let binary = layer.join("bin/bpg-tunnel");
    assert!(is_executable(&binary));
    assert!(
        file_type(&binary).contains("x86-64"),
        "{}",
        file_type(&binary)
    );
    // exec.d is the binary itself, not a script: a run image needs no shell for it.
    let exec_d = layer.join("exec.d/bpg-tunnel");
    assert_eq!(
        std::fs::read_link(&exec_d).unwrap(),
        Path::new("../bin/bpg-tunnel")
    );
    assert_eq!(&std::fs::read(&exec_d).unwrap()[..4], b"\x7fELF");

    // The launcher: layer bin on PATH; run exec.d as its direct child with fd 3 a pipe whose
    // reader ends only when every holder has closed it (a daemon holding it would hang here),
    // twice as for two processes; then exec the app in its own place, so exec.d's parent PID is
    // the app's. The app's second query comes after the
    // 1 s grace, so it proves the daemon is watching the app and not exec.d.
    let state = tempfile::tempdir().unwrap();
    let mut vars = dyno_vars(&lab, state.path());
    vars.insert("BPG_TUNNEL_GRACE".into(), "1s".into());
    vars.insert("EXEC_D".into(), exec_d.display().to_string());
    vars.insert(
        "FD3_OUT".into(),
        state.path().join("fd3.out").display().to_string(),
    );
    vars.insert("LAYER_BIN".into(), layer.join("bin").display().to_string());
    let launcher = r#"export PATH="$LAYER_BIN:$PATH"
for run in 1 2; do
  s=$(date +%s%N)
  "$EXEC_D" 3> >(cat >"$FD3_OUT"); rc=$?
  wait $!
  echo "exec.d run=$run rc=$rc ms=$(( ($(date +%s%N) - s) / 1000000 )) fd3=[$(cat "$FD3_OUT")]"
done
exec bash -c 'psql "$APP_URL" -XAtc "select 1" >/dev/null && echo first-query-ok
sleep 2.5
psql "$APP_URL" -XAtc "select 1" >/dev/null && echo later-query-ok'"#;
    let mut bash = Command::new("bash");
    bash.args(["-c", launcher]);
    let mut container = Tunnel::command(bash, vars.iter());
    container.wait_for(&["first-query-ok"], T);
    let daemon = daemon_pid(state.path()).expect("exec.d started the daemon");
    let status = container.wait_exit(T).expect("the app finishes");
    let lines = container.lines();
    let out = lines.join("\n");
    assert!(status.success(), "{out}");
    let runs: Vec<&String> = lines.iter().filter(|l| l.starts_with("exec.d ")).collect();
    assert_eq!(runs.len(), 2, "{out}");
    for run in &runs {
        assert!(run.contains(" rc=0 ") && run.ends_with("fd3=[]"), "{out}");
        let ms: u64 = field(run, "ms").parse().unwrap();
        assert!(ms < 10_000, "exec.d returns promptly: {run}");
    }
    eprintln!("exec.d: {}", runs[0]);
    assert!(out.contains("first-query-ok"), "{out}");
    assert!(out.contains("later-query-ok"), "{out}");
    assert_eq!(container.count("event=already-running"), 1, "{out}");
    assert_eq!(container.count("event=ssh-connected"), 1, "{out}");
    assert!(
        wait_gone(daemon, Duration::from_secs(8)).is_some(),
        "follows the app"
    );
}

/// A Dockerfile instruction's exec-form (JSON array of plain strings) arguments.
fn exec_form(dockerfile: &str, instruction: &str) -> Vec<String> {
    let line = dockerfile
        .lines()
        .rfind(|l| l.starts_with(&format!("{instruction} ")))
        .unwrap_or_else(|| panic!("Dockerfile.example has no {instruction}"));
    let array = line[instruction.len()..].trim();
    let inner = array
        .strip_prefix('[')
        .and_then(|a| a.strip_suffix(']'))
        .unwrap_or_else(|| panic!("{instruction} must be in exec form: {line}"));
    assert!(!inner.contains('\\'), "no escapes expected: {line}");
    inner
        .split(',')
        .map(|item| {
            item.trim()
                .strip_prefix('"')
                .and_then(|i| i.strip_suffix('"'))
                .unwrap_or_else(|| panic!("not a JSON string: {item}"))
                .to_owned()
        })
        .collect()
}

#[test]
fn dockerfile_example_entrypoint_and_cmd_run_the_app_under_bpg_tunnel_as_pid_1() {
    let Some(lab) = support::lab() else { return };
    if !support::can_unshare_pid() {
        return;
    }
    let dockerfile = std::fs::read_to_string(repo().join("Dockerfile.example")).unwrap();
    let entrypoint = exec_form(&dockerfile, "ENTRYPOINT");
    let cmd = exec_form(&dockerfile, "CMD");
    assert_eq!(entrypoint, ["bpg-tunnel", "run", "--"]);

    // The image's app server, stood in for by a script of the same name on PATH: it queries at
    // boot, and on SIGTERM finishes a query before exiting, as a draining gunicorn would.
    let bin = tempfile::tempdir().unwrap();
    let app = bin.path().join(&cmd[0]);
    std::fs::write(
        &app,
        r#"#!/bin/bash
trap 'psql "$APP_URL" -XAtc "select 1" >/dev/null && echo drain-query-ok; exit 0' TERM
echo "app-args=$*"
psql "$APP_URL" -XAtc "select 1" >/dev/null && echo first-query-ok
echo app-ready
while true; do sleep 0.1; done
"#,
    )
    .unwrap();
    std::fs::set_permissions(&app, std::fs::Permissions::from_mode(0o755)).unwrap();

    let state = tempfile::tempdir().unwrap();
    let mut vars = dyno_vars(&lab, state.path());
    let tunnel_dir = support::tunnel_binary().parent().unwrap().to_owned();
    let path = std::env::join_paths(
        [bin.path().to_owned(), tunnel_dir]
            .into_iter()
            .chain(std::env::split_paths(&std::env::var_os("PATH").unwrap())),
    )
    .unwrap();
    vars.insert("PATH".into(), path.to_string_lossy().into_owned());
    let mut unshare = Command::new("unshare");
    unshare
        .args(["--pid", "--fork", "--kill-child", "--mount-proc"])
        .args(&entrypoint)
        .args(&cmd);
    let mut container = Tunnel::command(unshare, vars.iter());
    container.wait_for(&["app-ready"], T);
    let out = container.lines().join("\n");
    assert!(out.contains("first-query-ok"), "{out}");
    assert!(
        out.contains(&format!("app-args={}", cmd[1..].join(" "))),
        "{out}"
    );
    let pid1 = support::descendants(container.pid())[0];
    assert_eq!(
        std::fs::read_to_string(format!("/proc/{pid1}/comm"))
            .unwrap()
            .trim(),
        "bpg-tunnel"
    );
    support::signal(pid1, libc::SIGTERM);
    let status = container
        .wait_exit(T)
        .expect("the container exits with its app");
    let out = container.lines().join("\n");
    assert!(out.contains("drain-query-ok"), "{out}");
    assert_eq!(status.code(), Some(0), "{out}");
}

#[test]
fn release_binary_is_static_and_the_tarball_matches_its_checksum() {
    let (Some(binary), Some(_)) = (
        std::env::var_os("BPG_TUNNEL_BIN").map(PathBuf::from),
        std::env::var_os("BPG_TUNNEL_DIST"),
    ) else {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("CI=true: set BPG_TUNNEL_BIN and BPG_TUNNEL_DIST to what scripts/dist.sh built");
        }
        eprintln!("SKIPPED: BPG_TUNNEL_BIN and BPG_TUNNEL_DIST (the release build) are not set");
        return;
    };
    let file = file_type(&binary);
    assert!(file.contains("static"), "{file}");
    assert!(
        file.contains("stripped") && !file.contains("not stripped"),
        "{file}"
    );
    let ldd = Command::new("ldd").arg(&binary).output().unwrap();
    let ldd = text(&ldd);
    assert!(
        ldd.contains("statically linked") || ldd.contains("not a dynamic executable"),
        "{ldd}"
    );
    let version = Command::new(&binary).arg("--version").output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&version.stdout).trim(),
        format!("bpg-tunnel {}", env!("CARGO_PKG_VERSION"))
    );

    let tarball = support::release_tarball();
    let name = tarball.file_name().unwrap().to_string_lossy().into_owned();
    assert_eq!(
        name,
        format!(
            "bpg-tunnel-{}-x86_64-unknown-linux-musl.tar.gz",
            env!("CARGO_PKG_VERSION")
        )
    );
    let listing = Command::new("tar")
        .arg("-tzf")
        .arg(&tarball)
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&listing.stdout), "bpg-tunnel\n");
    let check = Command::new("sha256sum")
        .args(["--check", "--status"])
        .arg(format!("{name}.sha256"))
        .current_dir(tarball.parent().unwrap())
        .status()
        .unwrap();
    assert!(check.success(), "the .sha256 file matches the tarball");
}

#[test]
fn aarch64_release_is_a_static_arm64_binary_that_forwards_under_qemu() {
    let Some(lab) = support::lab() else { return };
    let Some(tarball) = dist_artifact("BPG_TUNNEL_DIST_AARCH64") else {
        return;
    };
    let qemu = support::which("qemu-aarch64-static").expect(
        "qemu-aarch64-static (package qemu-user-static, installed by scripts/toolchain.sh)",
    );
    let dir = unpacked(&tarball);
    let binary = dir.path().join("bpg-tunnel");
    let described = file_type(&binary);
    assert!(
        described.contains("ARM aarch64") && described.contains("statically linked"),
        "{described}"
    );
    let version = Command::new(&qemu)
        .arg(&binary)
        .arg("--version")
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&version.stdout).trim(),
        format!("bpg-tunnel {}", env!("CARGO_PKG_VERSION"))
    );

    // The foreground form under emulation, and a real query through it.
    let state = tempfile::tempdir().unwrap();
    let vars = dyno_vars(&lab, state.path());
    let mut command = Command::new(&qemu);
    command.arg(&binary);
    let mut tunnel = Tunnel::command(command, vars.iter());
    tunnel.wait_for(&["event=ready"], Duration::from_secs(60));
    let query = Command::new("psql")
        .arg(&vars["APP_URL"])
        .args(["-XAtc", "select 'arm64-' || 41 + 1"])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&query.stdout).trim(),
        "arm64-42",
        "{}",
        text(&query)
    );
    tunnel.signal(libc::SIGTERM);
    let status = tunnel.wait_exit(T).expect("the tunnel stops on SIGTERM");
    assert!(status.success(), "{}", tunnel.lines().join("\n"));
}

/// `ARG NAME=default` lines of a Dockerfile.
fn build_args(dockerfile: &str) -> BTreeMap<String, String> {
    dockerfile
        .lines()
        .filter_map(|line| line.strip_prefix("ARG "))
        .filter_map(|arg| arg.split_once('='))
        .map(|(name, value)| (name.to_owned(), value.to_owned()))
        .collect()
}

#[test]
fn dockerfile_example_installs_a_release_only_with_its_pinned_checksum() {
    let dockerfile = std::fs::read_to_string(repo().join("Dockerfile.example")).unwrap();
    let args = build_args(&dockerfile);
    let pin: BTreeMap<String, String> =
        std::fs::read_to_string(repo().join("buildpack/bpg-tunnel.pin"))
            .unwrap()
            .lines()
            .filter(|line| !line.starts_with('#'))
            .filter_map(|line| line.split_once('='))
            .map(|(key, value)| (key.to_owned(), value.to_owned()))
            .collect();
    // One release, one set of checksums: the defaults are the buildpack's pin.
    assert_eq!(args["BPG_TUNNEL_VERSION"], pin["version"]);
    assert_eq!(args["BPG_TUNNEL_RELEASES"], pin["base"]);
    assert_eq!(
        args["BPG_TUNNEL_SHA256_X86_64"],
        pin["sha256.x86_64-unknown-linux-musl"]
    );
    assert_eq!(
        args["BPG_TUNNEL_SHA256_AARCH64"],
        pin["sha256.aarch64-unknown-linux-musl"]
    );

    // The install step, run as Docker runs it: continuation lines joined, `sh -c`, the build
    // arguments in the environment (scratch directories instead of /usr/local/bin and /tmp).
    let start = dockerfile.find("RUN set -eu;").expect("the install step");
    let step: String = dockerfile[start + "RUN ".len()..]
        .lines()
        .take_while(|line| !line.trim().is_empty())
        .map(|line| line.strip_suffix('\\').unwrap_or(line))
        .collect();
    let bin = tempfile::tempdir().unwrap();
    let scratch = tempfile::tempdir().unwrap();
    let step = step
        .replace("/tmp/", &format!("{}/", scratch.path().display()))
        .replace("/usr/local/bin", &bin.path().display().to_string());
    let version = env!("CARGO_PKG_VERSION");
    let releases = local_releases(version);
    // TARGETARCH as BuildKit sets it; the classic builder leaves it unset (dpkg says amd64 here).
    let install = |sha: &str, base: &str, arch: Option<&str>| {
        let mut sh = Command::new("sh");
        sh.arg("-c")
            .arg(&step)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("BPG_TUNNEL_VERSION", version)
            .env("BPG_TUNNEL_RELEASES", base)
            .env("BPG_TUNNEL_SHA256_X86_64", sha)
            .env("BPG_TUNNEL_SHA256_AARCH64", "");
        if let Some(arch) = arch {
            sh.env("TARGETARCH", arch);
        }
        sh.output().unwrap()
    };
    let base = file_url(releases.path());
    let installed = bin.path().join("bpg-tunnel");

    let refused = install(&"0".repeat(64), &base, Some("amd64"));
    assert_refused(&refused, "FAILED");
    assert!(!installed.exists(), "nothing installed on a mismatch");

    // No checksum pinned for arm64 (as here): refused before any download.
    let unpinned = install(&tarball_sha256(), &base, Some("arm64"));
    assert_refused(&unpinned, "Set --build-arg BPG_TUNNEL_RELEASES");

    let ok = install(&tarball_sha256(), &base, None);
    assert!(ok.status.success(), "{}", text(&ok));
    let said = Command::new(&installed).arg("--version").output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&said.stdout).trim(),
        format!("bpg-tunnel {version}")
    );
}
