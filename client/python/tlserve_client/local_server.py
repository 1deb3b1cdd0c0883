"""Runs a tlserve binary on a free loopback port for tests, experiments and
examples: `with LocalServer(bin_dir, backbone, data_dir) as s: s.target`."""
import os
import socket
import subprocess
import time


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalServer:
    def __init__(self, bin_dir, backbone, data_dir, log_path=None, extra_flags=(), ready_timeout=300):
        self.bin_dir, self.backbone, self.data_dir = bin_dir, backbone, data_dir
        self.port, self.metrics_port = free_port(), free_port()
        self.target = "127.0.0.1:%d" % self.port
        self.log_path = log_path or os.path.join(data_dir + ".log")
        self.extra_flags = list(extra_flags)
        self.ready_timeout = ready_timeout
        self.process = None

    def start(self):
        os.makedirs(os.path.dirname(os.path.abspath(self.log_path)), exist_ok=True)
        self._log = open(self.log_path, "w")
        self.process = subprocess.Popen(
            [os.path.join(self.bin_dir, "tlserve"), "--backbone=" + self.backbone,
             "--port=%d" % self.port, "--metrics_port=%d" % self.metrics_port, "--host=127.0.0.1",
             "--device=cpu", "--data_dir=" + self.data_dir] + self.extra_flags,
            stderr=self._log, stdout=self._log)
        deadline = time.time() + self.ready_timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError("tlserve exited with %d; its log:\n%s" % (self.process.returncode, self.log()))
            r = subprocess.run([os.path.join(self.bin_dir, "tlctl"), "--server=" + self.target, "health"],
                               capture_output=True)
            if r.returncode == 0:
                return self
            time.sleep(0.2)
        self.stop()
        raise RuntimeError("tlserve did not become healthy in %d s; its log:\n%s" % (self.ready_timeout, self.log()))

    def tlctl(self, *args, timeout=1800):
        r = subprocess.run([os.path.join(self.bin_dir, "tlctl"), "--server=" + self.target] + list(args),
                           capture_output=True, text=True, timeout=timeout)
        if r.returncode != 0:
            raise RuntimeError("tlctl %s failed (%d): %s" % (" ".join(args), r.returncode, r.stderr))
        return r.stdout

    def log(self):
        with open(self.log_path) as f:
            return f.read()[-4000:]

    def stop(self):
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process:
            self._log.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
