//! The one place that renders the reports: lines for people, with what to do under a failed
//! step, or one JSON document for scripts. Both show the same steps, details and advice.

use std::fmt::Write as _;

use super::Report;

/// Every report as `check` prints it, JSON when `json`; `ok` is the overall verdict.
pub(super) fn render(reports: &[Report], ok: bool, json: bool) -> String {
    if json {
        self::json(reports, ok)
    } else {
        human(reports)
    }
}

fn human(reports: &[Report]) -> String {
    let mut out = String::new();
    if reports.is_empty() {
        out.push_str("no *_TUNNEL_BPG_CONN_INFO variable is set: nothing to check\n");
        return out;
    }
    for report in reports {
        let _ = writeln!(out, "{} ({}, {})", report.addon, report.var, report.mode);
        for (index, outcome) in report.outcomes.iter().enumerate() {
            let mark = if outcome.ok { "✓" } else { "✗" };
            let took = outcome
                .took
                .map(|took| format!(" ({} ms)", took.as_millis()))
                .unwrap_or_default();
            let _ = writeln!(
                out,
                "  {mark} {:<13}{}{took}",
                outcome.step.name(),
                outcome.detail
            );
            // Said once under the last of several failures it covers (config problems).
            let next_advice = report
                .outcomes
                .get(index + 1)
                .and_then(|next| next.advice.as_ref());
            if let Some(advice) = outcome
                .advice
                .as_ref()
                .filter(|advice| Some(*advice) != next_advice)
            {
                let _ = writeln!(out, "    what to do: {advice}");
            }
        }
    }
    let passed = reports.iter().filter(|report| report.ok()).count();
    if passed == reports.len() {
        let _ = writeln!(out, "every add-on passes ({passed})");
    } else {
        let _ = writeln!(
            out,
            "{} of {} add-ons fail",
            reports.len() - passed,
            reports.len()
        );
    }
    out
}

fn json(reports: &[Report], ok: bool) -> String {
    let addons: Vec<serde_json::Value> = reports
        .iter()
        .map(|report| {
            let steps: Vec<serde_json::Value> = report
                .outcomes
                .iter()
                .map(|outcome| {
                    serde_json::json!({
                        "step": outcome.step.name(),
                        "ok": outcome.ok,
                        "ms": outcome.took.map(|took| took.as_millis() as u64),
                        "detail": outcome.detail,
                        "advice": outcome.advice,
                    })
                })
                .collect();
            serde_json::json!({
                "addon": report.addon,
                "var": report.var,
                "mode": report.mode,
                "ok": report.ok(),
                "steps": steps,
            })
        })
        .collect();
    format!("{}\n", serde_json::json!({ "ok": ok, "addons": addons }))
}
