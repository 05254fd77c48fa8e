-- The producer's account with exactly the grants it needs on MySQL 8.4 (deploy/README.md,
-- "Grants"). caching_sha2_password is MySQL 8.4's default; mysql_async speaks it.
CREATE USER 'rtinval'@'%' IDENTIFIED BY 'rtinval';
GRANT REPLICATION SLAVE, REPLICATION CLIENT ON *.* TO 'rtinval'@'%';
GRANT SELECT ON racktables.* TO 'rtinval'@'%';
