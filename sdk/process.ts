/** Small helpers about host processes, shared by the CLI's start-up files. */

/** True when a process with this pid exists (EPERM means it exists but is not ours). */
export function processAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === "EPERM";
  }
}

/**
 * Sends SIGTERM to `pid`, waits up to `graceMs` for it to exit, then SIGKILLs it. Resolves once
 * it is gone; a pid that does not exist resolves at once.
 */
export async function terminateProcess(pid: number, graceMs = 30_000): Promise<void> {
  if (!(pid > 0) || !processAlive(pid)) return;
  try {
    process.kill(pid, "SIGTERM");
  } catch {
    return;
  }
  for (let waited = 0; waited < graceMs; waited += 100) {
    if (!processAlive(pid)) return;
    await new Promise((r) => setTimeout(r, 100));
  }
  try {
    process.kill(pid, "SIGKILL");
  } catch {
    // exited meanwhile
  }
}
