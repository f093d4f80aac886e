"""The browser UI's files (HTML, script, style), served by ``cpp serve`` and copied into static galleries."""
