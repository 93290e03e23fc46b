//! Private-app-tunnel mode: the add-on's API answers, and takes the token. The check registers
//! under an id of its own and removes the registration again, so a serving daemon's is never
//! touched.

use std::time::Instant;

use crate::config::PrivateApp;
use crate::private_app::{ApiError, Registration, RegistrationSettings};

use super::{Report, Step};

pub(super) async fn check_private_app(
    app: &PrivateApp,
    client_id: &str,
    settings: &RegistrationSettings,
    report: &mut Report,
) {
    // The process's own id, so a daemon's registration is never touched; the suffix tells the
    // add-on's operators that this one was a check.
    let check_id = format!("{client_id}_check");
    let registration = match Registration::new(app, &check_id, settings) {
        Ok(registration) => registration,
        Err(error) => {
            return report.fail(
                Step::Api,
                None,
                error.to_string(),
                "fix the setting named above",
            )
        }
    };
    let started = Instant::now();
    let result = registration.probe().await;
    let took = Some(started.elapsed());
    match result {
        Ok(cleanup) => {
            report.pass(Step::Api, None, format!("{} answered", app.api_base_url));
            let detail = match cleanup {
                Ok(()) => format!("registered as {check_id:?} and removed again"),
                Err(error) => format!(
                    "registered as {check_id:?}; removing it failed ({error}), the add-on drops \
                     it within 75 min"
                ),
            };
            report.pass(Step::Token, took, detail);
        }
        Err(error @ ApiError::Status { .. }) => {
            report.pass(Step::Api, None, format!("{} answered", app.api_base_url));
            let advice = if error.is_refusal() {
                "the add-on refused CLIENT_APP_JWT: it may be expired or revoked (attach the \
                 add-on again to refresh it)"
            } else {
                "the add-on's API failed: retry in a minute; if it persists, contact the add-on's \
                 support"
            };
            report.fail(Step::Token, took, error.to_string(), advice);
        }
        Err(error) => report.fail(
            Step::Api,
            took,
            error.to_string(),
            format!(
                "check API_BASE_URL in {}, and that this dyno can reach it",
                app.conn_info_var
            ),
        ),
    }
}
