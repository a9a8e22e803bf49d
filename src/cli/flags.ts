/** Flag values arrive as strings; these turn them into numbers or name the flag that is wrong. */
import { KinoError } from "../errors.ts";

export function numberFlag(value: string | undefined, field: string): number | undefined {
  if (value === undefined) return undefined;
  const n = Number(value);
  if (value.trim() === "" || !Number.isFinite(n)) {
    throw new KinoError("INVALID_ARGUMENT", `must be a number; got "${value}"`, { field });
  }
  return n;
}

export function integerFlag(value: string | undefined, field: string): number | undefined {
  const n = numberFlag(value, field);
  if (n !== undefined && !Number.isInteger(n)) {
    throw new KinoError("INVALID_ARGUMENT", `must be a whole number; got "${value}"`, { field });
  }
  return n;
}
