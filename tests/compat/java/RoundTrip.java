// Write and read OAuth tokens through pgseal with pgjdbc, and print what the
// client read, one tab-separated record per line.
//
// Usage: java -cp postgresql.jar:. RoundTrip JDBC_URL USER COUNT BATCH
// The password comes from the PGPASSWORD environment variable. Each prepared
// statement runs COUNT times; with prepareThreshold=5 in the URL, pgjdbc
// switches from unnamed to named server-prepared statements after five runs.
// BATCH is the number of rows inserted afterwards with one executeBatch.

import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.SQLException;
import java.sql.Statement;
import java.util.Properties;

public final class RoundTrip {
    private static final String INSERT =
        "INSERT INTO oauth_tokens (user_id, access_token, refresh_token) VALUES (?, ?, ?)";
    private static final String SELECT_ONE =
        "SELECT access_token, refresh_token FROM oauth_tokens WHERE user_id = ?";

    private RoundTrip() {
    }

    static String token(int userId) {
        return "gho_jdbc_" + userId + "_Nm8bV0Nm8bV0Nm8bV0Nm8bV0";
    }

    public static void main(String[] args) throws SQLException {
        Properties login = new Properties();
        login.setProperty("user", args[1]);
        login.setProperty("password", System.getenv("PGPASSWORD"));
        int count = Integer.parseInt(args[2]);
        int batch = Integer.parseInt(args[3]);

        try (Connection conn = DriverManager.getConnection(args[0], login)) {
            try (PreparedStatement insert = conn.prepareStatement(INSERT)) {
                for (int userId = 1; userId <= count; userId++) {
                    insert.setInt(1, userId);
                    insert.setString(2, token(userId));
                    insert.setString(3, userId % 2 == 0 ? "refresh-" + userId : null);
                    insert.executeUpdate();
                }
            }

            // A batch sends one Bind and Execute per row before a single Sync,
            // and pgjdbc checks the parameter types that the server describes.
            try (PreparedStatement insert = conn.prepareStatement(INSERT)) {
                for (int userId = count + 1; userId <= count + batch; userId++) {
                    insert.setInt(1, userId);
                    insert.setString(2, token(userId));
                    insert.setNull(3, java.sql.Types.VARCHAR);
                    insert.addBatch();
                }
                if (batch > 0) {
                    insert.executeBatch();
                }
            }

            try (PreparedStatement select = conn.prepareStatement(SELECT_ONE)) {
                for (int userId = 1; userId <= count; userId++) {
                    select.setInt(1, userId);
                    try (ResultSet rows = select.executeQuery()) {
                        while (rows.next()) {
                            System.out.println("one\t" + userId + "\t" + rows.getString(1)
                                + "\t" + rows.getString(2));
                        }
                    }
                }
            }

            try (Statement plain = conn.createStatement();
                 ResultSet rows = plain.executeQuery(
                     "SELECT user_id, access_token FROM oauth_tokens ORDER BY user_id")) {
                while (rows.next()) {
                    System.out.println("all\t" + rows.getInt(1) + "\t" + rows.getString(2));
                }
            }

            try (PreparedStatement like = conn.prepareStatement(
                     "SELECT id FROM oauth_tokens WHERE access_token LIKE ?")) {
                like.setString(1, "gho%");
                like.executeQuery().close();
                System.out.println("rejected\tnone");
            } catch (SQLException error) {
                System.out.println("rejected\t" + error.getSQLState());
            }
        }
    }
}
