"""The plugins bundled with cshare-overlay, written only against cshare_fuse.plugin_api."""
