# Shortcuts for the scripts under scripts/ (each installs what it needs).
.PHONY: test bench bench-smoke demo dist

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
