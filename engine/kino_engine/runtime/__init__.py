"""What kino applies to models from outside: memory accounting now; offload, precision, caches later."""
