/**
 * Keeps the last lines a process wrote (bounded in lines and bytes), so an error can show what the
 * engine said before it failed without holding its whole log.
 */
export class OutputTail {
  readonly #lines: string[] = [];
  #bytes = 0;
  #partial = "";

  readonly #maxLines: number;
  readonly #maxBytes: number;

  /** @param maxLines @default 64 @param maxBytes @default 8192 */
  constructor(maxLines = 64, maxBytes = 8 * 1024) {
    this.#maxLines = maxLines;
    this.#maxBytes = maxBytes;
  }

  /** Adds a chunk; complete lines are returned (for logging) and kept. */
  push(chunk: string): string[] {
    const parts = (this.#partial + chunk).split("\n");
    this.#partial = parts.pop() ?? "";
    for (const line of parts) this.#keep(line);
    return parts;
  }

  /** The kept lines, including an unterminated last one. */
  text(): string {
    return [...this.#lines, ...(this.#partial === "" ? [] : [this.#partial])].join("\n");
  }

  #keep(line: string): void {
    this.#lines.push(line);
    this.#bytes += line.length + 1;
    while (this.#lines.length > this.#maxLines || (this.#bytes > this.#maxBytes && this.#lines.length > 1)) {
      this.#bytes -= (this.#lines.shift() ?? "").length + 1;
    }
  }
}
