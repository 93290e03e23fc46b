//! `bpg-tunnel check`: the doctor. For each add-on in the environment it walks the path a
//! connection takes, one step at a time, and stops at the first step that fails, saying what to
//! do about it: config → DNS → TCP to the SSH server → SSH handshake → host key → key
//! accepted → a channel to each database host → PostgreSQL answers there (→ with `--login`, a
//! login with the URL's credentials and `select 1`). In private-app-tunnel mode: config → the
//! add-on's API answers → the token is accepted.
//!
//! It binds no port, so it runs beside a serving daemon (`heroku ps:exec`), and it prints what
//! the log lines print: variable names, hosts, ports, key types and fingerprints, database user
//! and database names, never a value that may hold a secret. The PostgreSQL step sends only an
//! `SSLRequest`, which a server answers before any credentials, and closes: nothing in the
//! server's log. Only `--login` reads a password, from the URL variable, at the moment it logs
//! in; it uses TLS as the URL's `sslmode` says, as the app's client does (`pg_tls`).
//!
//! This file owns the model (steps, their outcomes, a report per add-on), the config step and
//! the order of each add-on's walk; one file per kind of check, and one that renders:
//! - `ssh`: DNS, TCP, the SSH handshake, the host key and the key;
//! - `forward`: a channel to each database host, and PostgreSQL's answer there;
//! - `login`: `--login`, with TLS as libpq would choose it;
//! - `private_app`: the add-on's API and the registration under the check's own id;
//! - `render`: the reports, for people or as one JSON document.

use std::process::ExitCode;
use std::time::Duration;

use crate::config::{self, Addon, Discovery, Severity};
use crate::dyno::Dyno;
use crate::private_app::RegistrationSettings;
use crate::ssh::SessionSettings;

mod forward;
mod login;
mod private_app;
mod render;
mod ssh;

/// What `check` needs; see [`crate::options::Options`].
#[derive(Debug, Clone)]
pub struct CheckSettings {
    pub session: SessionSettings,
    pub registration: RegistrationSettings,
    /// The dyno, whose client id a private-app check registers under (with `_check` added).
    pub dyno: Dyno,
    /// One JSON document on stdout instead of lines for people.
    pub json: bool,
    /// Also log in to each database with its URL's credentials and run `select 1`.
    pub login: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Config,
    Dns,
    Tcp,
    Handshake,
    HostKey,
    KeyAccepted,
    Channel,
    Postgres,
    Login,
    Api,
    Token,
}

impl Step {
    fn name(self) -> &'static str {
        match self {
            Step::Config => "config",
            Step::Dns => "dns",
            Step::Tcp => "tcp",
            Step::Handshake => "handshake",
            Step::HostKey => "host-key",
            Step::KeyAccepted => "key-accepted",
            Step::Channel => "channel",
            Step::Postgres => "postgres",
            Step::Login => "login",
            Step::Api => "api",
            Step::Token => "token",
        }
    }
}

/// One step's outcome.
struct Outcome {
    step: Step,
    ok: bool,
    /// Not every step is timed on its own: the handshake, the host key and the key are one
    /// exchange, timed on its last step.
    took: Option<Duration>,
    detail: String,
    /// For a failed step: what the user can do about it.
    advice: Option<String>,
}

/// Everything checked for one add-on.
struct Report {
    addon: String,
    var: String,
    mode: &'static str,
    outcomes: Vec<Outcome>,
}

impl Report {
    fn new(addon: &str, var: &str, mode: &'static str) -> Report {
        Report {
            addon: addon.to_owned(),
            var: var.to_owned(),
            mode,
            outcomes: Vec::new(),
        }
    }

    fn ok(&self) -> bool {
        self.outcomes.iter().all(|outcome| outcome.ok)
    }

    fn pass(&mut self, step: Step, took: Option<Duration>, detail: impl Into<String>) {
        self.outcomes.push(Outcome {
            step,
            ok: true,
            took,
            detail: detail.into(),
            advice: None,
        });
    }

    /// Records a failure; the caller stops checking this add-on.
    fn fail(
        &mut self,
        step: Step,
        took: Option<Duration>,
        detail: impl Into<String>,
        advice: impl Into<String>,
    ) {
        self.outcomes.push(Outcome {
            step,
            ok: false,
            took,
            detail: detail.into(),
            advice: Some(advice.into()),
        });
    }
}

/// Runs every check and prints the reports; success only if every add-on passes.
pub async fn run(settings: &CheckSettings) -> ExitCode {
    let discovery = config::discover_env();
    let mut reports = unusable(&discovery);
    let notes = |addon: &str| -> String {
        discovery
            .problems
            .iter()
            .filter(|problem| problem.addon == addon)
            .map(|problem| format!("; {problem}"))
            .collect()
    };
    for addon in &discovery.addons {
        let mut report = Report::new(&addon.name, &addon.conn_info_var, "ssh-tunnel");
        let forwards: Vec<String> = addon
            .forwards
            .iter()
            .map(|forward| {
                format!(
                    "{} {} -> {}",
                    forward.role,
                    forward.listen,
                    config::host_port(&forward.remote_host, forward.remote_port)
                )
            })
            .collect();
        report.pass(
            Step::Config,
            None,
            format!(
                "SSH tunnel through {} as {:?}: {}{}",
                addon.ssh.address(),
                addon.ssh.username,
                forwards.join(", "),
                notes(&addon.name)
            ),
        );
        check_tunnel(addon, settings, &mut report).await;
        reports.push(report);
    }
    if !discovery.private_apps.is_empty() {
        let client_id = &settings.dyno.client_id;
        // What the dyno's identity fell back on, said where the registration is checked.
        let identity: String = settings
            .dyno
            .notices()
            .iter()
            .map(|notice| format!("; {}", notice.notice))
            .collect();
        for app in &discovery.private_apps {
            let mut report = Report::new(&app.name, &app.conn_info_var, "private-app-tunnel");
            report.pass(
                Step::Config,
                None,
                format!(
                    "private-app tunnel with the add-on's API at {}{}{identity}",
                    app.api_base_url,
                    notes(&app.name)
                ),
            );
            private_app::check_private_app(app, client_id, &settings.registration, &mut report)
                .await;
            reports.push(report);
        }
    }
    let ok = !reports.is_empty() && reports.iter().all(Report::ok);
    print!("{}", render::render(&reports, ok, settings.json));
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Add-ons whose config could not be used at all: their errors are the report.
fn unusable(discovery: &Discovery) -> Vec<Report> {
    let mut reports = Vec::new();
    for problem in &discovery.problems {
        if problem.severity != Severity::Error {
            continue;
        }
        let served = discovery.addons.iter().any(|a| a.name == problem.addon)
            || discovery
                .private_apps
                .iter()
                .any(|a| a.name == problem.addon);
        if served {
            continue;
        }
        let report = match reports
            .iter()
            .position(|r: &Report| r.addon == problem.addon)
        {
            Some(index) => &mut reports[index],
            None => {
                reports.push(Report::new(&problem.addon, &problem.var, "unusable"));
                reports.last_mut().expect("just pushed")
            }
        };
        // Headed by the conn-info variable, whichever problem came first.
        if config::CONN_INFO_SUFFIXES
            .iter()
            .any(|suffix| problem.var.ends_with(suffix))
        {
            report.var.clone_from(&problem.var);
        }
        let var = &problem.var;
        report.fail(
            Step::Config,
            None,
            problem.to_string(),
            format!(
                "the add-on sets {var}: see that it was not edited or cut short \
                 (`heroku config:get {var}` shows it), or attach the add-on again"
            ),
        );
    }
    reports
}

/// An SSH-tunnel add-on past its config: the way to its SSH server, then each database host in
/// turn, each with its login under `--login`.
async fn check_tunnel(addon: &Addon, settings: &CheckSettings, report: &mut Report) {
    let Some(session) = ssh::check_session(addon, &settings.session, report).await else {
        return;
    };
    let limit = settings.session.connect_timeout;
    for forward in &addon.forwards {
        if !forward::check_forward(&session, forward, limit, report).await {
            break;
        }
        if settings.login && !login::check_login(&session, forward, limit, report).await {
            break;
        }
    }
    session.close().await;
}
