# Run with `site_packages` set: puts a virtualenv's packages before the interpreter's own.
import site, sys
before = set(sys.path)
site.addsitedir(site_packages)
added = [p for p in sys.path if p not in before]
rest = [p for p in sys.path if p in before]
# The user site counts too: a virtualenv's own Python does not see it at all.
base = set(site.getsitepackages()) | {site.getusersitepackages()}
at = next((i for i, p in enumerate(rest) if p in base), len(rest))
sys.path[:] = rest[:at] + added + rest[at:]
