# The capture of what a step prints or logs; loaded once per interpreter thread.
import io, logging, sys

class Capture(io.TextIOBase):
    def __init__(self):
        self.active = False
        self.reset(0)
    def reset(self, limit):
        self.parts, self.size, self.limit, self.truncated = [], 0, limit, False
    def writable(self):
        return True
    def write(self, text):
        text = text if isinstance(text, str) else str(text)
        if not self.active:
            if sys.__stderr__ is not None:
                sys.__stderr__.write(text)
            return len(text)
        room = self.limit - self.size
        piece = text[:max(room, 0)]
        if len(piece) < len(text):
            self.truncated = True
        if piece:
            self.parts.append(piece)
            self.size += len(piece)
        return len(text)
    def value(self):
        text = "".join(self.parts)
        if self.truncated:
            text += "\n[logs truncated at %d characters]\n" % self.limit
        self.parts = []
        return text

CAPTURE = Capture()
HANDLER = logging.StreamHandler(CAPTURE)
HANDLER.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
ROOT = logging.getLogger()
logging.getLogger("taskfleet.step").setLevel(logging.INFO)

def start(limit):
    # A step may have removed the root logger's handlers.
    if HANDLER not in ROOT.handlers:
        ROOT.addHandler(HANDLER)
    CAPTURE.reset(limit)
    CAPTURE.active = True
    saved = (sys.stdout, sys.stderr)
    sys.stdout = sys.stderr = CAPTURE
    return saved

def finish(saved):
    sys.stdout, sys.stderr = saved
    CAPTURE.active = False
    return CAPTURE.value()
