# Shortcuts for the scripts under scripts/ (each installs what it needs).
.PHONY: test bench bench-smoke demo dist fuzz lint-scripts reproducible

test:
	scripts/test.sh

bench:
	scripts/bench.sh

bench-smoke:
	scripts/bench.sh --smoke

demo:
	scripts/demo.sh

dist:
	scripts/dist.sh

# The property tests on everything that parses outside input, at 100,000 cases each (every test
# run does a quick slice of them).
fuzz:
	scripts/patch-russh.sh
	BPG_TUNNEL_FUZZ_CASES=100000 cargo test --locked --features test-api-ca --lib

lint-scripts:
	scripts/lint-scripts.sh

reproducible:
	scripts/reproducible.sh
