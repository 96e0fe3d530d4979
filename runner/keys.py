"""Names of the Redis keys and RQ queues shared by the web server and runners."""

PREFIX = "glassbox"
SHARED_QUEUE = "shared"
RUNNERS_SET = f"{PREFIX}:runners"


def runner_queue(runner_name: str) -> str:
    return f"runner.{runner_name}"


def heartbeat_key(runner_name: str) -> str:
    return f"{PREFIX}:runner:{runner_name}"


def input_key(run_id: str, input_name: str, index: int) -> str:
    return f"{PREFIX}:run:{run_id}:input:{input_name}:{index}"


def done_key(run_id: str) -> str:
    """Return the key of the list the run's final payload is pushed to."""
    return f"{PREFIX}:run:{run_id}:done"


def reap_lock_key(runner_name: str) -> str:
    return f"{PREFIX}:reap:{runner_name}"
